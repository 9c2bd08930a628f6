/**
 * Comm plumbing: one bridge per kernel connection this page tracks.
 *
 * The kernel never opens a comm unasked (a front end without this extension would
 * answer with an error). It registers a beacon comm that `comm_info` lists once
 * ftwidgets has a session there; the bridge asks on connection and after each
 * execution until it finds one. It then opens `ftwidgets.control` in a subshell of
 * its own, so that a command reaches the kernel while a cell is busy (ipykernel
 * hands a comm's messages to the subshell that last sent on it), saying hello; the
 * kernel answers by opening this page's `ftwidgets.telemetry`.
 */
import { Kernel, KernelMessage, CommsOverSubshells } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';

import { cellState } from './cellstate';
import { Coalesced } from './coalesce';
import { SessionModel } from './model';
import {
  Action,
  BEACON_TARGET,
  CONTROL_TARGET,
  ICommand,
  IPhaseEndNotice,
  IReply,
  ITelemetryOpen,
  TELEMETRY_TARGET,
  TelemetryMessage
} from './protocol';

let requests = 0;
/** While a cell is busy and no session was found yet, look this often. */
const POLL_MS = 2000;

/** The comm services 7.4+ create; `IComm` does not declare its subshell promise. */
type SubshellComm = Kernel.IComm & { subshellStarted?: Promise<void> };

export class KernelBridge {
  constructor(readonly kernel: Kernel.IKernelConnection) {
    kernel.registerCommTarget(TELEMETRY_TARGET, this._onTelemetryTarget);
    kernel.statusChanged.connect(this._onStatus, this);
    kernel.iopubMessage.connect(this._onIopub, this);
    void this._discover();
  }

  readonly model = new SessionModel();

  /** A phase ended in one of this kernel's sessions. */
  get phaseEnded(): ISignal<this, IPhaseEndNotice> {
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
    clearInterval(this._poll ?? undefined);
    this.kernel.removeCommTarget(TELEMETRY_TARGET, this._onTelemetryTarget);
    this.kernel.statusChanged.disconnect(this._onStatus, this);
    this.kernel.iopubMessage.disconnect(this._onIopub, this);
    Signal.clearData(this);
  }

  /**
   * Does the kernel run ftwidgets sessions? Its beacon says so; then say hello.
   * A look asked for while one is in flight runs again after it: the one in flight
   * may have been answered just before a cell made the first session.
   */
  private _discover(): Promise<void> {
    return this._discovery.run();
  }

  private async _lookForSessions(): Promise<void> {
    if (this._control) {
      return;
    }
    try {
      await this.kernel.info;
      this.model.setSubshells(this.kernel.supportsSubshells);
      const reply = await this._commInfo();
      const content = reply.content;
      if (content.status === 'ok' && Object.keys(content.comms).length > 0) {
        await this._openControl();
      }
    } catch (reason) {
      console.warn('ftwidgets: could not ask the kernel for its comms', reason);
    }
  }

  /** Ask for the beacon; in a subshell when possible, so a busy cell does not delay it. */
  private async _commInfo(): Promise<KernelMessage.ICommInfoReplyMsg> {
    const content = { target_name: BEACON_TARGET };
    if (!this.kernel.supportsSubshells) {
      return this.kernel.requestCommInfo(content);
    }
    if (!this._probeShell) {
      const created = await this.kernel.requestCreateSubshell({}).done;
      this._probeShell = (created as KernelMessage.ICreateSubshellReplyMsg).content.subshell_id;
    }
    const request = KernelMessage.createMessage({
      msgType: 'comm_info_request',
      channel: 'shell',
      session: this.kernel.clientId,
      username: this.kernel.username,
      content,
      subshellId: this._probeShell
    });
    const reply = await this.kernel.sendShellMessage(request, true).done;
    return reply as KernelMessage.ICommInfoReplyMsg;
  }

  private _onTelemetry(comm: Kernel.IComm, msg: KernelMessage.ICommOpenMsg): void {
    const data = msg.content.data as unknown as ITelemetryOpen;
    if (!this._controlComm || data.control !== this._controlComm.commId) {
      return; // another page's telemetry: that page reads it (closing it would end it)
    }
    this.model.applyOpen(data);
    comm.onMsg = message => {
      const data = message.content.data as unknown as TelemetryMessage;
      const notice = this.model.applyMessage(data);
      if (notice) {
        this._phaseEnded.emit(notice);
      }
    };
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
    this._controlComm = comm; // before the opening: the telemetry names it
    comm.open({ action: 'hello', request });
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
    // A restart drops every comm and subshell; the new kernel's beacon shows once it
    // makes a session, and the next look finds it.
    if (status === 'restarting' || status === 'autorestarting' || status === 'dead') {
      this._control = null;
      this._controlComm = null;
      this.model.reset();
      this._probeShell = null;
    }
  }

  private _onIopub(_: Kernel.IKernelConnection, msg: KernelMessage.IIOPubMessage): void {
    const state = cellState(msg);
    if (state === 'busy' && !this._poll) {
      // A busy cell may make the first session and then train in it: look again
      // every few seconds, in the probe's own subshell.
      this._poll = setInterval(() => void this._discover(), POLL_MS);
    } else if (state === 'idle') {
      clearInterval(this._poll ?? undefined);
      this._poll = null;
      void this._discover(); // a cell may just have made the first session
    }
  }

  private _control: Promise<Kernel.IComm | null> | null = null;
  private _discovery = new Coalesced(() => this._lookForSessions());
  private _probeShell: string | null = null;
  private _poll: ReturnType<typeof setInterval> | null = null;
  private _controlComm: Kernel.IComm | null = null;
  private _phaseEnded = new Signal<this, IPhaseEndNotice>(this);
  private _refused = new Signal<this, string>(this);
}

function nextRequest(): string {
  requests += 1;
  return `ftw-${Date.now().toString(36)}-${requests}`;
}
