/**
 * Comm plumbing: one bridge per kernel connection this page tracks.
 *
 * The kernel opens `ftwidgets.telemetry`; the bridge opens `ftwidgets.control` in a
 * subshell of its own, so that a command reaches the kernel while a cell is busy
 * (ipykernel hands a comm's messages to the subshell that last sent on it).
 */
import { Kernel, KernelMessage, CommsOverSubshells } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';

import { SessionModel } from './model';
import {
  Action,
  CONTROL_TARGET,
  ICommand,
  IPhaseEnded,
  IReply,
  ITelemetryOpen,
  TELEMETRY_TARGET,
  TelemetryMessage
} from './protocol';

let requests = 0;

/** The comm services 7.4+ create; `IComm` does not declare its subshell promise. */
type SubshellComm = Kernel.IComm & { subshellStarted?: Promise<void> };

export class KernelBridge {
  constructor(readonly kernel: Kernel.IKernelConnection) {
    kernel.registerCommTarget(TELEMETRY_TARGET, this._onTelemetryTarget);
    kernel.statusChanged.connect(this._onStatus, this);
    void this._discover();
  }

  readonly model = new SessionModel();

  /** A phase ended in one of this kernel's sessions. */
  get phaseEnded(): ISignal<this, IPhaseEnded> {
    return this._phaseEnded;
  }

  /** The kernel refused a command (or no control comm could be opened). */
  get refused(): ISignal<this, string> {
    return this._refused;
  }

  /** Send a command; it waits for the control comm (opening it if needed). */
  async send(action: Exclude<Action, 'hello'>, session?: string): Promise<void> {
    const comm = await this._openControl();
    if (!comm) {
      this._refused.emit('The kernel did not accept the fine-tuning control channel.');
      return;
    }
    const command: ICommand = { action, request: nextRequest() };
    if (session !== undefined) {
      command.session = session;
    }
    this.model.sent(command.request, action, session);
    comm.send({ ...command });
  }

  dispose(): void {
    this.kernel.removeCommTarget(TELEMETRY_TARGET, this._onTelemetryTarget);
    this.kernel.statusChanged.disconnect(this._onStatus, this);
    Signal.clearData(this);
  }

  /** A page that loads after ftwidgets started in the kernel asks which comms exist. */
  private async _discover(): Promise<void> {
    try {
      await this.kernel.info;
      this.model.setSubshells(this.kernel.supportsSubshells);
      const reply = await this.kernel.requestCommInfo({ target_name: TELEMETRY_TARGET });
      const content = reply.content;
      if (content.status === 'ok' && Object.keys(content.comms).length > 0) {
        await this._openControl();
      }
    } catch (reason) {
      console.warn('ftwidgets: could not ask the kernel for its comms', reason);
    }
  }

  private _onTelemetry(comm: Kernel.IComm, msg: KernelMessage.ICommOpenMsg): void {
    this.model.applyOpen(msg.content.data as unknown as ITelemetryOpen);
    comm.onMsg = message => {
      const data = message.content.data as unknown as TelemetryMessage;
      const notice = this.model.applyMessage(data);
      if (notice) {
        this._phaseEnded.emit(notice);
      }
    };
    // The kernel opened telemetry before this page said hello (it sends nothing until
    // then), or for another page: say hello once so it sends to this page too.
    void this._openControl();
  }

  // registerCommTarget keeps the callback it was given; removeCommTarget needs it back.
  private _onTelemetryTarget = (comm: Kernel.IComm, msg: KernelMessage.ICommOpenMsg) =>
    this._onTelemetry(comm, msg);

  /** The control comm, opened once per kernel with a hello; null if it could not open. */
  private _openControl(): Promise<Kernel.IComm | null> {
    if (!this._control) {
      this._control = this._createControl().catch(reason => {
        console.warn('ftwidgets: no control comm', reason);
        this._control = null;
        this.model.setControl('closed');
        return null;
      });
    }
    return this._control;
  }

  private async _createControl(): Promise<Kernel.IComm> {
    this.model.setControl('opening');
    const comm: SubshellComm = this.kernel.createComm(CONTROL_TARGET);
    // With comms over subshells switched off in the settings, this one comm still
    // gets a subshell: commands must not wait for a busy cell.
    if (comm.commsOverSubshells === CommsOverSubshells.Disabled) {
      comm.commsOverSubshells = CommsOverSubshells.PerComm;
    }
    await this.kernel.info;
    if (this.kernel.supportsSubshells) {
      // The comm is served concurrently only once its subshell runs (and only if
      // it opens from it); the promise never settles without subshell support.
      await comm.subshellStarted;
    }
    comm.onMsg = message => this._onReply(message.content.data as unknown as IReply);
    comm.onClose = () => {
      if (this._controlComm === comm) {
        this._controlComm = null;
        this._control = null;
        this.model.setControl('closed');
      }
    };
    // The hello rides on the opening: a message sent right after could reach the
    // kernel before the comm exists there.
    const request = nextRequest();
    this.model.sent(request, 'hello');
    comm.open({ action: 'hello', request });
    this._controlComm = comm;
    this.model.setControl('open');
    return comm;
  }

  private _onReply(reply: IReply): void {
    if (reply.type !== 'reply') {
      return;
    }
    const command = this.model.applyReply(reply);
    if (command && !reply.ok) {
      this._refused.emit(reply.message);
    }
  }

  private _onStatus(kernel: Kernel.IKernelConnection, status: Kernel.Status): void {
    // A restart drops every comm; the new kernel opens telemetry again when its first
    // session is made, and that opening brings a new control comm.
    if (status === 'restarting' || status === 'autorestarting' || status === 'dead') {
      this._control = null;
      this._controlComm = null;
      this.model.reset();
    }
  }

  private _control: Promise<Kernel.IComm | null> | null = null;
  private _controlComm: Kernel.IComm | null = null;
  private _phaseEnded = new Signal<this, IPhaseEnded>(this);
  private _refused = new Signal<this, string>(this);
}

function nextRequest(): string {
  requests += 1;
  return `ftw-${Date.now().toString(36)}-${requests}`;
}
