/**
 * The comm protocol between the kernel (ftwidgets/frontend/comms.py) and this extension.
 *
 * GENERATED from ftwidgets/frontend/protocol.py, the one declaration of these messages:
 * edit that, then run `python -m ftwidgets.frontend.protocol labextension/src/protocol.ts`.
 * tests/test_protocol.py fails while the two differ.
 */

/** The comm the kernel opens to send session cards and phase-end notices. */
export const TELEMETRY_TARGET = 'ftwidgets.telemetry';

/**
 * A comm the kernel registers but never sends: comm_info lists it once ftwidgets runs.
 */
export const BEACON_TARGET = 'ftwidgets.beacon';

/** The comm this extension opens, in its own subshell, to send commands. */
export const CONTROL_TARGET = 'ftwidgets.control';

/** The protocol version this extension speaks. */
export const PROTOCOL = 1;

/** What a session is doing. */
export type SessionState =
  | 'idle'
  | 'compiling'
  | 'running'
  | 'paused'
  | 'stopping'
  | 'failed';

/** What a phase trains: the head alone, or the head and the top of the base. */
export type Phase = 'head' | 'finetune';

/** Why a phase ended. */
export type Outcome =
  | 'completed'
  | 'early_stopped'
  | 'stopped'
  | 'callback'
  | 'rolled_back'
  | 'failed'
  | 'interrupted';

/** A command to the kernel as a whole: say hello, or stop every session. */
export type KernelAction = 'hello' | 'stop_all';

/** A command to one named session. */
export type SessionAction = 'stop' | 'pause' | 'resume' | 'rollback';

export type Action = KernelAction | SessionAction;

/** One session, as the status bar and the sidebar show it. */
export interface ICard {
  name: string;
  model: string;
  state: SessionState;
  searching: boolean;
  phase: Phase | null;
  /**
   * 1-based across the run, the number the panel, the charts and `restore_epoch` use.
   */
  run_epoch: number | null;
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
}

/** Every live session's card, oldest session first (at most once a second). */
export interface ISessionsMessage {
  type: 'sessions';
  sessions: ICard[];
}

/** A phase ended: what the notification says and offers. */
export interface IPhaseEndNotice {
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

export type TelemetryMessage = ISessionsMessage | IPhaseEndNotice;

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
  /** The command's action; null for one the kernel does not know. */
  action: Action | null;
  session: string | null;
  ok: boolean;
  message: string;
  protocol: number;
  subshells: boolean;
}
