/**
 * One run of an async task at a time. A call while it runs asks for one more run
 * after it (calls in between fold into that one), so the newest call always gets
 * an answer from after it was made.
 */
export class Coalesced {
  constructor(private readonly task: () => Promise<void>) {}

  /** Run the task, or once more after the run in flight; settles when that is done. */
  run(): Promise<void> {
    if (this._running) {
      this._again = true;
      return this._running;
    }
    this._running = this._loop().finally(() => {
      this._running = null;
    });
    return this._running;
  }

  private async _loop(): Promise<void> {
    do {
      this._again = false;
      await this.task();
    } while (this._again);
  }

  private _running: Promise<void> | null = null;
  private _again = false;
}
