import assert from 'node:assert/strict';
import { test } from 'node:test';

import { cellState } from '../cellstate';

function status(state: string, parent: string) {
  return {
    header: { msg_type: 'status' },
    parent_header: { msg_type: parent },
    content: { execution_state: state }
  };
}

test("a cell's busy and idle count; a subshell's comm_info and other messages do not", () => {
  assert.equal(cellState(status('busy', 'execute_request')), 'busy');
  assert.equal(cellState(status('idle', 'execute_request')), 'idle');
  // Seen in a real JupyterLab: the probe's comm_info went idle while the cell ran.
  assert.equal(cellState(status('idle', 'comm_info_request')), null);
  assert.equal(cellState(status('busy', 'create_subshell_request')), null);
  assert.equal(cellState(status('starting', 'execute_request')), null);
  assert.equal(
    cellState({ header: { msg_type: 'stream' }, parent_header: {}, content: {} }),
    null
  );
  assert.equal(cellState({ header: { msg_type: 'status' }, parent_header: {}, content: {} }), null);
});
