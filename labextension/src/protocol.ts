/**
 * The comm protocol between the kernel (ftwidgets/comms.py) and this extension.
 *
 * The shapes mirror ftwidgets/telemetry.py; keep both in step.
 */

/** The comm the kernel opens to send session cards and phase-end notices. */
export const TELEMETRY_TARGET = 'ftwidgets.telemetry';
/** A comm the kernel registers but never sends: comm_info lists it once ftwidgets runs. */
export const BEACON_TARGET = 'ftwidgets.beacon';
/** The comm this extension opens, in its own subshell, to send commands. */
export const CONTROL_TARGET = 'ftwidgets.control';
/** The protocol version this extension speaks. */
export const PROTOCOL = 1;

export type SessionState =
  | 'idle'
  | 'compiling'
  | 'running'
  | 'paused'
  | 'stopping'
  | 'failed';

export type Phase = 'head' | 'finetune';

/** One session, as the status bar and the sidebar show it. */
export interface ICard {
  name: string;
  model: string;
  state: SessionState;
  searching: boolean;
  phase: Phase | null;
  /**
   * 1-based across the run, the number the panel, the charts and `restore_epoch`
   * use; absent from a kernel older than this field.
   */
  run_epoch?: number | null;
  /** 1-based within the phase. */
  epoch: number | null;
  epochs: number | null;
  learning_rate: number | null;
  monitor: string;
  /** The monitored value of the last full epoch. */
  value: number | null;
  /** 1-based, counted across phases. */
  best_epoch: number | null;
  best_value: number | null;
  spark: number[];
  can_roll_back: boolean;
  /** A CSS class on the session's panel, if a panel shows it. */
  panel_class: string | null;
  error: string | null;
}

/** The data of the telemetry comm's opening. */
export interface ITelemetryOpen {
  protocol: number;
  subshells: boolean;
  /** The id of the control comm whose hello opened it: each page keeps its own. */
  control: string;
  sessions?: ICard[];
}

export interface ISessionsMessage {
  type: 'sessions';
  sessions: ICard[];
}

export type Outcome =
  | 'completed'
  | 'early_stopped'
  | 'stopped'
  | 'callback'
  | 'rolled_back'
  | 'failed';

export interface IPhaseEnded {
  type: 'phase_ended';
  session: string;
  outcome: Outcome;
  phase: Phase;
  /** 1-based. */
  restored_epoch: number | null;
  message: string | null;
  can_roll_back: boolean;
  panel_class: string | null;
}

export type TelemetryMessage = ISessionsMessage | IPhaseEnded;

export type SessionAction = 'stop' | 'pause' | 'resume' | 'rollback';
export type Action = 'hello' | 'stop_all' | SessionAction;

/** A command on the control comm. */
export interface ICommand {
  action: Action;
  request: string;
  session?: string;
}

/** The kernel's answer to one command, on the control comm. */
export interface IReply {
  type: 'reply';
  request: string | null;
  action: Action | null;
  session: string | null;
  ok: boolean;
  message: string;
  subshells: boolean;
}
