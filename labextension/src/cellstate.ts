/**
 * A kernel's iopub status messages come from every request, subshells' included: our
 * own probe's comm_info says "idle" while a cell still runs. JupyterLab folds them
 * all into one status, so the idle that ends a cell can arrive when that status
 * already reads idle, and change nothing. Only a cell's own messages tell when it
 * started and ended.
 */

/** The part of an iopub message this reads. */
export interface IStatusLike {
  header: { msg_type: string };
  parent_header: { msg_type?: string } | Record<string, never>;
  content: unknown;
}

/** ``busy`` or ``idle`` when ``msg`` says a cell started or ended, else null. */
export function cellState(msg: IStatusLike): 'busy' | 'idle' | null {
  if (msg.header.msg_type !== 'status') {
    return null;
  }
  if ((msg.parent_header as { msg_type?: string }).msg_type !== 'execute_request') {
    return null;
  }
  const state = (msg.content as { execution_state?: string }).execution_state;
  return state === 'busy' || state === 'idle' ? state : null;
}
