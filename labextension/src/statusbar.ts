/**
 * The status bar item: the active notebook kernel's headline session. Hidden when the
 * kernel has no session; a click opens the sidebar.
 */
import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import { KernelBridge } from './kernels';
import { statusText } from './model';

export class FineTuningStatus extends Widget {
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

  set bridge(bridge: KernelBridge | null) {
    if (bridge === this._bridge) {
      return;
    }
    this._unsubscribe?.();
    this._unsubscribe = bridge?.model.onChange(() => this._render()) ?? null;
    this._bridge = bridge;
    this._render();
  }

  dispose(): void {
    this._unsubscribe?.();
    super.dispose();
  }

  private _render(): void {
    const card = this._bridge?.model.headline ?? null;
    this.node.textContent = card ? statusText(card) : '';
    this.node.dataset.state = card?.state ?? '';
    this._activeChanged.emit();
  }

  private _bridge: KernelBridge | null = null;
  private _unsubscribe: (() => void) | null = null;
  private _activeChanged = new Signal<this, void>(this);
}
