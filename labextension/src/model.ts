/**
 * The sessions of one kernel, as this page knows them: a pure model.
 *
 * It applies telemetry and replies and tracks the control comm's state. No DOM
 * and no JupyterLab imports, so its tests run on plain Node.
 */
import {
  IPhaseEndNotice,
  IReply,
  ICard,
  ITelemetryOpen,
  PROTOCOL,
  SessionAction,
  TelemetryMessage
} from './protocol';

/** Where this page's control comm to the kernel stands. */
export type ControlState = 'none' | 'opening' | 'open' | 'closed';

const ACTIVE = new Set(['compiling', 'running', 'paused', 'stopping']);

export class SessionModel {
  /** Every live session of the kernel, oldest first. */
  get sessions(): readonly ICard[] {
    return this._sessions;
  }

  /**
   * Whether the kernel serves comms on subshells, so a command reaches a busy
   * cell; null until the kernel or the kernel info says.
   */
  get subshells(): boolean | null {
    return this._subshells;
  }

  get control(): ControlState {
    return this._control;
  }

  /** Why the kernel's telemetry is unusable (a newer protocol), else null. */
  get problem(): string | null {
    return this._problem;
  }

  /** Call `listener` after every change; returns a function that unsubscribes. */
  onChange(listener: () => void): () => void {
    this._listeners.add(listener);
    return () => this._listeners.delete(listener);
  }

  session(name: string): ICard | undefined {
    return this._sessions.find(card => card.name === name);
  }

  /** The card the status bar shows: the first busy session, else a failed one, else the newest. */
  get headline(): ICard | null {
    const cards = this._sessions;
    return (
      cards.find(card => ACTIVE.has(card.state)) ??
      cards.find(card => card.state === 'failed') ??
      cards[cards.length - 1] ??
      null
    );
  }

  /** Whether a command for `session` is waiting for the kernel's reply. */
  isPending(session: string, action: SessionAction): boolean {
    for (const command of this._pending.values()) {
      if (command.session === session && command.action === action) {
        return true;
      }
    }
    return false;
  }

  /** A telemetry comm opened: it replaces whatever an older one said. */
  applyOpen(data: ITelemetryOpen): void {
    this._problem =
      data.protocol === PROTOCOL
        ? null
        : `The kernel's ftwidgets speaks protocol ${data.protocol}; this extension speaks ${PROTOCOL}. Update one of them.`;
    // The kernel's first update, right after the opening, brings every card.
    this._sessions = [];
    this._subshells = data.subshells;
    this._emit();
  }

  /** A telemetry message; returns the phase-end notice to show, if it was one. */
  applyMessage(message: TelemetryMessage): IPhaseEndNotice | null {
    if (this._problem) {
      return null;
    }
    if (message.type === 'sessions') {
      this._sessions = message.sessions;
      this._emit();
      return null;
    }
    if (message.type === 'phase_ended') {
      return message;
    }
    return null; // a newer kernel's message type: nothing to do with it
  }

  /** The kernel told whether it has subshells (from its kernel info). */
  setSubshells(subshells: boolean): void {
    if (this._subshells !== subshells) {
      this._subshells = subshells;
      this._emit();
    }
  }

  setControl(state: ControlState): void {
    if (state !== 'open') {
      this._pending.clear(); // no reply will come on a comm that never opened or closed
    }
    this._control = state;
    this._emit();
  }

  /** Record a command sent with id `request`, until its reply comes. */
  sent(request: string, action: string, session?: string): void {
    this._pending.set(request, { action, session });
    this._emit();
  }

  /** The kernel replied; returns the command the reply answers, if this page sent it. */
  applyReply(reply: IReply): { action: string; session?: string } | null {
    this._subshells = reply.subshells;
    const command = reply.request ? this._pending.get(reply.request) : undefined;
    if (reply.request) {
      this._pending.delete(reply.request);
    }
    this._emit();
    return command ?? null;
  }

  /** The kernel restarted or went away: its sessions are gone. */
  reset(): void {
    this._sessions = [];
    this._problem = null;
    this._pending.clear();
    this._control = 'none';
    this._emit();
  }

  private _emit(): void {
    for (const listener of [...this._listeners]) {
      listener();
    }
  }

  private _sessions: ICard[] = [];
  private _subshells: boolean | null = null;
  private _control: ControlState = 'none';
  private _problem: string | null = null;
  private _pending = new Map<string, { action: string; session?: string }>();
  private _listeners = new Set<() => void>();
}

/** A number in at most four significant digits, as the panel shows it. */
export function formatNumber(value: number | null): string {
  if (value === null || !Number.isFinite(value)) {
    return '–';
  }
  const size = Math.abs(value);
  if (size !== 0 && (size < 1e-3 || size >= 1e5)) {
    return value.toExponential(1);
  }
  return String(Number(value.toPrecision(4)));
}

/** The phase in words. */
export function phaseLabel(phase: ICard['phase']): string {
  return phase === 'head' ? 'head' : phase === 'finetune' ? 'fine-tune' : '';
}

/**
 * "epoch 33 (3/30)": the run's epoch, as the panel counts it, then the phase's; ''
 * outside a phase. `phaseWords` adds the panel's "of this phase" where there is room.
 */
export function epochLabel(card: ICard, phaseWords = false): string {
  if (card.epoch === null) {
    return '';
  }
  const ofPhase = phaseWords ? ' of this phase' : '';
  const within = card.epochs === null ? `${card.epoch}` : `${card.epoch}/${card.epochs}`;
  if (card.run_epoch === undefined || card.run_epoch === null) {
    // An older kernel sends only the phase's count: say so rather than pass it off as the run's.
    return `epoch ${within} of this phase`;
  }
  return `epoch ${card.run_epoch} (${within}${ofPhase})`;
}

/** The status bar's text for a card. */
export function statusText(card: ICard): string {
  if (card.state === 'failed') {
    return `${card.name}: failed`;
  }
  if (!ACTIVE.has(card.state)) {
    const best = card.best_epoch === null ? '' : ` · best epoch ${card.best_epoch}`;
    return `${card.name}: idle${best}`;
  }
  const parts = [card.name + ':'];
  if (card.searching) {
    parts.push('LR search');
  } else if (card.phase) {
    parts.push(phaseLabel(card.phase));
  }
  if (card.state !== 'running') {
    parts.push(card.state);
  }
  const epoch = epochLabel(card);
  if (epoch) {
    parts.push(epoch);
  }
  if (card.value !== null) {
    parts.push(`${card.monitor} ${formatNumber(card.value)}`);
  }
  if (card.best_epoch !== null) {
    parts.push(`best ${card.best_epoch}`);
  }
  return parts.join(' ');
}

/** The `points` of an SVG polyline drawing `values` in a `width` x `height` box. */
export function sparkPoints(values: readonly number[], width: number, height: number): string {
  if (values.length === 0) {
    return '';
  }
  const low = Math.min(...values);
  const span = Math.max(...values) - low || 1;
  const step = values.length > 1 ? width / (values.length - 1) : 0;
  return values
    .map((value, i) => {
      const x = values.length > 1 ? i * step : width / 2;
      const y = height - ((value - low) / span) * height;
      return `${round(x)},${round(y)}`;
    })
    .join(' ');
}

function round(value: number): number {
  return Math.round(value * 10) / 10;
}
