import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Coalesced } from '../coalesce';

/** A task whose runs each wait until the test lets them finish. */
function gatedTask() {
  const gates: Array<() => void> = [];
  let runs = 0;
  const task = new Coalesced(
    () =>
      new Promise<void>(resolve => {
        runs += 1;
        gates.push(resolve);
      })
  );
  const open = async () => {
    gates.shift()?.();
    await new Promise(resolve => setImmediate(resolve));
  };
  return { task, open, runs: () => runs };
}

test('a call while a run is in flight runs the task once more after it', async () => {
  const { task, open, runs } = gatedTask();
  const first = task.run();
  assert.equal(runs(), 1);
  // Three calls arrive while the first run waits (a poll, then the idle status).
  const later = [task.run(), task.run(), task.run()];
  assert.equal(runs(), 1, 'no second run while one is in flight');
  await open();
  assert.equal(runs(), 2, 'the calls in flight fold into one more run');
  await open();
  await Promise.all([first, ...later]);
  assert.equal(runs(), 2);
});

test('a call after a run has settled starts a new one', async () => {
  const { task, open, runs } = gatedTask();
  const first = task.run();
  await open();
  await first;
  const second = task.run();
  assert.equal(runs(), 2);
  await open();
  await second;
  assert.equal(runs(), 2);
});
