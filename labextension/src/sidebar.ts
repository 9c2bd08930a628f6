/**
 * The "Fine-tuning" sidebar: one card per live session of the active notebook's kernel.
 *
 * Cards are updated in place, never rebuilt: telemetry comes up to five times a
 * second, and a button replaced between press and release would lose the click.
 */

import { epochLabel, formatNumber, phaseLabel, sparkPoints } from './model';
import { ICard, SessionAction } from './protocol';
import { BridgeView } from './view';

const SPARK_WIDTH = 120;
const SPARK_HEIGHT = 24;
const SVG = 'http://www.w3.org/2000/svg';

export class FineTuningSidebar extends BridgeView {
  constructor() {
    super();
    this.id = 'ftwidgets-sidebar';
    this.addClass('ftw-sidebar');
    this.title.caption = 'Fine-tuning';
    const heading = document.createElement('h2');
    heading.className = 'ftw-sidebar-title';
    heading.textContent = 'Fine-tuning';
    this._note = document.createElement('p');
    this._note.className = 'ftw-note';
    this._subshells = document.createElement('p');
    this._subshells.className = 'ftw-no-subshells';
    this._subshells.textContent =
      'This kernel has no subshells: commands apply when the running cell ends.';
    this._list = document.createElement('div');
    this._list.className = 'ftw-sessions';
    this.node.append(heading, this._note, this._subshells, this._list);
    this._render();
  }


  protected _render(): void {
    const model = this._bridge?.model;
    const cards = model?.sessions ?? [];
    this._note.textContent = !model
      ? 'Open a notebook to see its fine-tuning sessions.'
      : model.problem ?? (cards.length === 0 ? 'No fine-tuning session in this kernel.' : '');
    this._note.hidden = this._note.textContent === '';
    this._subshells.hidden = !model || model.subshells !== false || cards.length === 0;

    const seen = new Set<string>();
    for (const card of cards) {
      seen.add(card.name);
      let view = this._views.get(card.name);
      if (!view) {
        view = new CardView(card.name, (action, name) => this._bridge?.send(action, name));
        this._views.set(card.name, view);
      }
      this._list.appendChild(view.node); // moves it into the kernel's order
      view.update(card, action => model?.isPending(card.name, action) ?? false);
    }
    for (const [name, view] of this._views) {
      if (!seen.has(name)) {
        view.node.remove();
        this._views.delete(name);
      }
    }
  }

  private _views = new Map<string, CardView>();
  private _note: HTMLElement;
  private _subshells: HTMLElement;
  private _list: HTMLElement;
}

/** One session's card. */
class CardView {
  constructor(
    name: string,
    private _act: (action: SessionAction, name: string) => void
  ) {
    this.node = element('section', 'ftw-session');
    this.node.dataset.session = name;
    const header = element('header', 'ftw-session-header');
    this._name = element('span', 'ftw-session-name');
    this._state = element('span', 'ftw-session-state');
    header.append(this._name, this._state);

    this._facts = element('dl', 'ftw-facts');
    this._svg = document.createElementNS(SVG, 'svg');
    this._svg.classList.add('ftw-spark');
    this._svg.setAttribute('viewBox', `-1 -1 ${SPARK_WIDTH + 2} ${SPARK_HEIGHT + 2}`);
    this._svg.setAttribute('width', String(SPARK_WIDTH));
    this._svg.setAttribute('height', String(SPARK_HEIGHT));
    this._line = document.createElementNS(SVG, 'polyline');
    this._svg.appendChild(this._line);
    this._error = element('p', 'ftw-session-error');

    const buttons = element('div', 'ftw-buttons');
    this._stop = this._button('stop', 'Stop');
    this._pause = this._button('pause', 'Pause');
    this._resume = this._button('resume', 'Resume');
    this._rollback = this._button('rollback', 'Roll back');
    buttons.append(this._stop, this._pause, this._resume, this._rollback);
    this.node.append(header, this._facts, this._svg, this._error, buttons);
  }

  readonly node: HTMLElement;

  update(card: ICard, pending: (action: SessionAction) => boolean): void {
    this._name.textContent = card.name;
    this._name.title = `model ${card.model}`;
    this._state.textContent = card.searching ? `${card.state} (LR search)` : card.state;
    this._state.dataset.state = card.state;
    this.node.dataset.state = card.state;

    const best =
      card.best_epoch === null
        ? '–'
        : `epoch ${card.best_epoch} (${card.monitor} ${formatNumber(card.best_value)})`;
    this._setFacts([
      ['phase', phaseLabel(card.phase) || '–'],
      ['epoch', epochLabel(card, true).replace('epoch ', '') || '–'],
      ['learning rate', formatNumber(card.learning_rate)],
      [card.monitor, formatNumber(card.value)],
      ['best', best]
    ]);

    this._line.setAttribute('points', sparkPoints(card.spark, SPARK_WIDTH, SPARK_HEIGHT));
    this._svg.setAttribute('aria-label', `${card.monitor} over the last ${card.spark.length} epochs`);
    this._svg.style.display = card.spark.length > 1 ? '' : 'none';
    this._error.textContent = card.error ?? '';
    this._error.hidden = !card.error;

    const busy = card.state === 'running' || card.state === 'compiling';
    this._show(this._stop, busy || card.state === 'paused', pending('stop'));
    this._show(this._pause, card.state === 'running', pending('pause'));
    this._show(this._resume, card.state === 'paused', pending('resume'));
    this._show(this._rollback, card.can_roll_back, pending('rollback'));
    this._rollback.textContent =
      card.best_epoch === null ? 'Roll back' : `Roll back to epoch ${card.best_epoch}`;
  }

  private _button(action: SessionAction, label: string): HTMLButtonElement {
    const button = element('button', 'jp-mod-styled ftw-button') as HTMLButtonElement;
    button.type = 'button';
    button.dataset.ftwAction = action;
    button.textContent = label;
    button.addEventListener('click', () => {
      const name = this.node.dataset.session;
      if (name) {
        this._act(action, name);
      }
    });
    return button;
  }

  private _show(button: HTMLButtonElement, visible: boolean, pending: boolean): void {
    button.hidden = !visible;
    button.disabled = pending;
  }

  private _setFacts(rows: [string, string][]): void {
    while (this._facts.children.length < rows.length * 2) {
      this._facts.append(element('dt', ''), element('dd', ''));
    }
    rows.forEach(([term, value], i) => {
      this._facts.children[2 * i].textContent = term;
      this._facts.children[2 * i + 1].textContent = value;
    });
  }

  private _name: HTMLElement;
  private _state: HTMLElement;
  private _facts: HTMLElement;
  private _svg: SVGSVGElement;
  private _line: SVGPolylineElement;
  private _error: HTMLElement;
  private _stop: HTMLButtonElement;
  private _pause: HTMLButtonElement;
  private _resume: HTMLButtonElement;
  private _rollback: HTMLButtonElement;
}

function element(tag: string, className: string): HTMLElement {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  return node;
}
