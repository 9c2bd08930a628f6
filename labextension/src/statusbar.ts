/**
 * The status bar item: the active notebook kernel's headline session. Hidden when the
 * kernel has no session; a click opens the sidebar.
 */
import { ISignal, Signal } from '@lumino/signaling';

import { statusText } from './model';
import { BridgeView } from './view';

export class FineTuningStatus extends BridgeView {
  constructor(onClick: () => void) {
    super();
    this.addClass('ftw-status');
    this.node.title = 'Fine-tuning sessions: click to open the sidebar';
    this.node.addEventListener('click', onClick);
  }

  /** Whether there is anything to show; the status bar hides the item otherwise. */
  get hasSession(): boolean {
    return (this._bridge?.model.sessions.length ?? 0) > 0;
  }

  /** Emitted when `hasSession` may have changed. */
  get activeChanged(): ISignal<this, void> {
    return this._activeChanged;
  }


  protected _render(): void {
    const card = this._bridge?.model.headline ?? null;
    this.node.textContent = card ? statusText(card) : '';
    this.node.dataset.state = card?.state ?? '';
    this._activeChanged.emit();
  }

  private _activeChanged = new Signal<this, void>(this);
}
