/**
 * A widget that shows one kernel's sessions and redraws when they change.
 */
import { Widget } from '@lumino/widgets';

import { KernelBridge } from './kernels';

export abstract class BridgeView extends Widget {
  /** The kernel whose sessions to show (the active notebook's), or null. */
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

  protected abstract _render(): void;

  protected _bridge: KernelBridge | null = null;
  private _unsubscribe: (() => void) | null = null;
}
