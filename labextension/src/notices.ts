/**
 * What a phase-end notification says and offers: a pure function, so it is tested
 * without JupyterLab. "Roll back to best" is offered wherever the kernel says a best
 * epoch exists and is not restored already (an early stop that kept its last weights).
 */
import { IPhaseEndNotice } from './protocol';

export type NoticeKind = 'success' | 'info' | 'warning' | 'error';
export type NoticeAction = 'rollback' | 'panel';

export interface INotice {
  kind: NoticeKind;
  text: string;
  actions: NoticeAction[];
}

export function phaseEndNotice(event: IPhaseEndNotice): INotice {
  const phase = event.phase === 'finetune' ? 'fine-tune' : 'head';
  const who = `${event.session} (${phase} phase)`;
  const panel: NoticeAction[] = event.panel_class ? ['panel'] : [];
  const rollback: NoticeAction[] = event.can_roll_back ? ['rollback'] : [];
  const restored =
    event.restored_epoch === null ? '' : ` and restored the best epoch, ${event.restored_epoch}`;
  switch (event.outcome) {
    case 'completed':
      return { kind: 'success', text: `${who} finished.`, actions: [...rollback, ...panel] };
    case 'early_stopped':
      return {
        kind: 'info',
        text: `${who} stopped early${restored}.`,
        actions: [...rollback, ...panel]
      };
    case 'callback':
      // As the panel says it: the user's own Keras callback set model.stop_training.
      return {
        kind: 'info',
        text: `${who}: a callback stopped the phase (model.stop_training)${restored}.`,
        actions: [...rollback, ...panel]
      };
    case 'failed': {
      const why = event.message ? `: ${event.message}` : '.';
      return { kind: 'error', text: `${who} failed${why}`, actions: [...rollback, ...panel] };
    }
    case 'rolled_back':
      return { kind: 'info', text: `${who} was rolled back.`, actions: [] };
    case 'stopped':
      return { kind: 'info', text: `${who} was stopped.`, actions: [] };
    default:
      return { kind: 'info', text: `${who} ended (${String(event.outcome)}).`, actions: [] };
  }
}
