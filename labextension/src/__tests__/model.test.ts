import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  SessionModel,
  epochLabel,
  formatNumber,
  sparkPoints,
  statusText
} from '../model';
import { phaseEndNotice } from '../notices';
import { ICard, IPhaseEndNotice } from '../protocol';

function card(overrides: Partial<ICard> = {}): ICard {
  return {
    name: 'session-1',
    model: 'transfer',
    state: 'running',
    searching: false,
    phase: 'head',
    run_epoch: 33,
    epoch: 3,
    epochs: 40,
    learning_rate: 0.001,
    monitor: 'val_loss',
    value: 0.41234,
    best_epoch: 2,
    best_value: 0.4,
    spark: [0.9, 0.5, 0.41],
    can_roll_back: true,
    panel_class: null,
    error: null,
    ...overrides
  };
}

function notice(overrides: Partial<IPhaseEndNotice> = {}): IPhaseEndNotice {
  return {
    type: 'phase_ended',
    session: 'session-1',
    outcome: 'completed',
    phase: 'head',
    restored_epoch: null,
    message: null,
    can_roll_back: true,
    panel_class: 'ftw-panel-session-1',
    ...overrides
  };
}

test('an opening forgets the sessions and says whether the kernel has subshells', () => {
  const model = new SessionModel();
  let changes = 0;
  model.onChange(() => (changes += 1));
  model.applyOpen({ protocol: 1, control: 'c', subshells: false });
  assert.equal(model.subshells, false);
  assert.equal(changes, 1);
  model.applyMessage({ type: 'sessions', sessions: [card()] });
  assert.equal(model.sessions.length, 1);
  model.applyOpen({ protocol: 1, control: 'c', subshells: true });
  assert.deepEqual(model.sessions, []);
  assert.equal(model.subshells, true);
  assert.equal(model.headline, null);
});

test('a sessions message replaces the list; a phase end is handed back, not stored', () => {
  const model = new SessionModel();
  model.applyOpen({ protocol: 1, control: 'c', subshells: true });
  const none = model.applyMessage({ type: 'sessions', sessions: [card(), card({ name: 'b' })] });
  assert.equal(none, null);
  assert.deepEqual(
    model.sessions.map(c => c.name),
    ['session-1', 'b']
  );
  const ended = notice();
  assert.equal(model.applyMessage(ended), ended);
  assert.equal(model.sessions.length, 2);
});

test('a newer protocol is refused with a reason, and its messages ignored', () => {
  const model = new SessionModel();
  model.applyOpen({ protocol: 2, control: 'c', subshells: true });
  assert.match(model.problem ?? '', /protocol 2/);
  assert.deepEqual(model.sessions, []);
  model.applyMessage({ type: 'sessions', sessions: [card()] });
  assert.deepEqual(model.sessions, []);
});

test('the headline is the first busy session, else a failed one, else the newest', () => {
  const model = new SessionModel();
  const idle = card({ name: 'a', state: 'idle' });
  const failed = card({ name: 'b', state: 'failed' });
  const paused = card({ name: 'c', state: 'paused' });
  model.applyOpen({ protocol: 1, control: 'c', subshells: true });
  model.applyMessage({ type: 'sessions', sessions: [idle, failed, paused] });
  assert.equal(model.headline?.name, 'c');
  model.applyMessage({ type: 'sessions', sessions: [idle, failed] });
  assert.equal(model.headline?.name, 'b');
  model.applyMessage({ type: 'sessions', sessions: [idle, card({ name: 'd', state: 'idle' })] });
  assert.equal(model.headline?.name, 'd');
});

test('a command is pending until its reply; a closed comm forgets every pending one', () => {
  const model = new SessionModel();
  model.setControl('open');
  model.sent('r1', 'stop', 'session-1');
  assert.equal(model.isPending('session-1', 'stop'), true);
  assert.equal(model.isPending('session-1', 'pause'), false);
  const command = model.applyReply({
    type: 'reply',
    request: 'r1',
    action: 'stop',
    session: 'session-1',
    ok: true,
    message: 'stopping',
    protocol: 1,
    subshells: false
  });
  assert.deepEqual(command, { action: 'stop', session: 'session-1' });
  assert.equal(model.isPending('session-1', 'stop'), false);
  assert.equal(model.subshells, false);

  model.sent('r2', 'pause', 'session-1');
  model.setControl('closed');
  assert.equal(model.isPending('session-1', 'pause'), false);
  const stray = model.applyReply({
    type: 'reply',
    request: 'r2',
    action: 'pause',
    session: 'session-1',
    ok: true,
    message: '',
    protocol: 1,
    subshells: true
  });
  assert.equal(stray, null);
});

test('a reset forgets the sessions and the control comm', () => {
  const model = new SessionModel();
  model.applyOpen({ protocol: 1, control: 'c', subshells: true });
  model.applyMessage({ type: 'sessions', sessions: [card()] });
  model.setControl('open');
  model.reset();
  assert.deepEqual(model.sessions, []);
  assert.equal(model.control, 'none');
});

test('an unsubscribed listener hears nothing more', () => {
  const model = new SessionModel();
  let changes = 0;
  const stop = model.onChange(() => (changes += 1));
  model.setSubshells(true);
  stop();
  model.setSubshells(false);
  assert.equal(changes, 1);
});

test('the status text names the session, phase, epoch, value and best epoch', () => {
  assert.equal(statusText(card()), 'session-1: head epoch 33 (3/40) val_loss 0.4123 best 2');
  assert.equal(
    statusText(card({ state: 'paused', phase: 'finetune' })),
    'session-1: fine-tune paused epoch 33 (3/40) val_loss 0.4123 best 2'
  );
  assert.equal(statusText(card({ state: 'idle' })), 'session-1: idle · best epoch 2');
  assert.equal(statusText(card({ state: 'idle', best_epoch: null })), 'session-1: idle');
  assert.equal(statusText(card({ state: 'failed' })), 'session-1: failed');
  assert.equal(
    statusText(card({ searching: true, epoch: null, value: null, best_epoch: null })),
    'session-1: LR search'
  );
});

test("the epoch is the run's, as the panel says it, then the phase's", () => {
  assert.equal(epochLabel(card()), 'epoch 33 (3/40)');
  assert.equal(epochLabel(card(), true), 'epoch 33 (3/40 of this phase)');
  assert.equal(epochLabel(card({ epochs: null })), 'epoch 33 (3)');
  assert.equal(epochLabel(card({ run_epoch: null, epoch: null, epochs: null })), '');
  // A kernel from before run_epoch: the phase's count, never passed off as the run's.
  const older: Partial<ICard> = card();
  delete older.run_epoch;
  assert.equal(epochLabel(older as ICard), 'epoch 3/40 of this phase');
});

test('numbers keep four significant digits; tiny and huge ones go exponential', () => {
  assert.equal(formatNumber(0.41234), '0.4123');
  assert.equal(formatNumber(1e-5), '1.0e-5');
  assert.equal(formatNumber(0), '0');
  assert.equal(formatNumber(null), '–');
  assert.equal(formatNumber(Number.NaN), '–');
});

test('the sparkline spans the box, low values at the bottom', () => {
  assert.equal(sparkPoints([], 100, 10), '');
  assert.equal(sparkPoints([1, 0, 2], 100, 10), '0,5 50,10 100,0');
  assert.equal(sparkPoints([3], 100, 10), '50,10');
  assert.equal(sparkPoints([2, 2], 100, 10), '0,10 100,10');
});

test('phase-end notices offer what the outcome allows', () => {
  assert.deepEqual(phaseEndNotice(notice()).actions, ['rollback', 'panel']);
  assert.deepEqual(
    phaseEndNotice(notice({ can_roll_back: false, panel_class: null })).actions,
    []
  );
  const early = phaseEndNotice(
    notice({ outcome: 'early_stopped', restored_epoch: 7, can_roll_back: false })
  );
  assert.match(early.text, /restored the best epoch, 7/);
  assert.deepEqual(early.actions, ['panel']);
  const kept = phaseEndNotice(
    notice({ outcome: 'early_stopped', restored_epoch: null, can_roll_back: true })
  );
  assert.match(kept.text, /stopped early\.$/);
  assert.deepEqual(kept.actions, ['rollback', 'panel']);
  const failed = phaseEndNotice(notice({ outcome: 'failed', message: 'NaN loss' }));
  assert.equal(failed.kind, 'error');
  assert.match(failed.text, /failed: NaN loss/);
  assert.deepEqual(failed.actions, ['rollback', 'panel']);
  assert.deepEqual(phaseEndNotice(notice({ outcome: 'rolled_back' })).actions, []);
  const callback = phaseEndNotice(notice({ outcome: 'callback' }));
  assert.equal(
    callback.text,
    'session-1 (head phase): a callback stopped the phase (model.stop_training).'
  );
  assert.deepEqual(callback.actions, ['rollback', 'panel']);
  assert.match(
    phaseEndNotice(notice({ outcome: 'callback', restored_epoch: 4 })).text,
    /\(model\.stop_training\) and restored the best epoch, 4\.$/
  );
  const stopped = phaseEndNotice(notice({ outcome: 'stopped' }));
  assert.equal(stopped.kind, 'info');
  assert.deepEqual(stopped.actions, []);
});
