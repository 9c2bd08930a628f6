/**
 * The ftwidgets JupyterLab extension: a status bar item, a "Fine-tuning" sidebar,
 * notifications and two commands for the fine-tuning sessions of the active
 * notebook's kernel.
 *
 * Every dependency is optional: Voila has no notebook tracker (the plugin then does
 * nothing) and Notebook 7 has no status bar (the rest still works).
 */
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, InputDialog, Notification } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { Kernel } from '@jupyterlab/services';
import { LabIcon } from '@jupyterlab/ui-components';

import { KernelBridge } from './kernels';
import { INotice, phaseEndNotice } from './notices';
import { IPhaseEndNotice } from './protocol';
import { FineTuningSidebar } from './sidebar';
import { FineTuningStatus } from './statusbar';

namespace CommandIDs {
  export const stopAll = 'ftwidgets:stop-all';
  export const insertPanel = 'ftwidgets:insert-panel';
  export const showSidebar = 'ftwidgets:show-sidebar';
}

const NOTICE_MS = 8000;

const fineTuningIcon = new LabIcon({
  name: 'ftwidgets:fine-tuning',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><path class="jp-icon3" fill="#616161" d="M3 17l5-6 4 3 6-8 3 2-8 11-4-3-4 5z"/></svg>'
});

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'ftwidgets:plugin',
  description: 'Status bar item, sidebar and notifications for ftwidgets fine-tuning sessions.',
  autoStart: true,
  optional: [INotebookTracker, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker | null,
    palette: ICommandPalette | null
  ) => {
    if (!tracker) {
      return; // Voila, or any front end without notebooks
    }
    const bridges = new Map<Kernel.IKernelConnection, KernelBridge>();
    const sidebar = new FineTuningSidebar();
    sidebar.title.icon = fineTuningIcon;
    app.shell.add(sidebar, 'right', { rank: 900 });
    const status = new FineTuningStatus(() => app.shell.activateById(sidebar.id));
    void addStatusItem(app, status);

    const bridgeFor = (kernel: Kernel.IKernelConnection | null | undefined) => {
      if (!kernel || kernel.isDisposed) {
        return null;
      }
      let bridge = bridges.get(kernel);
      if (!bridge) {
        const created = new KernelBridge(kernel);
        created.phaseEnded.connect((_, event) => notify(created, event));
        created.refused.connect((_, message) => Notification.warning(message, { autoClose: 5000 }));
        kernel.disposed.connect(() => {
          created.dispose();
          bridges.delete(kernel);
        });
        bridges.set(kernel, created);
        bridge = created;
      }
      return bridge;
    };
    const activeBridge = () => bridgeFor(tracker.currentWidget?.sessionContext.session?.kernel);
    const showActive = () => {
      const bridge = activeBridge();
      sidebar.bridge = bridge;
      status.bridge = bridge;
      app.commands.notifyCommandChanged(CommandIDs.stopAll);
    };

    const panelOf = (bridge: KernelBridge): NotebookPanel | undefined =>
      tracker.find(panel => panel.sessionContext.session?.kernel === bridge.kernel);

    const showPanel = (bridge: KernelBridge, panelClass: string) => {
      const notebook = panelOf(bridge);
      if (notebook) {
        app.shell.activateById(notebook.id);
      }
      // After activation the notebook is attached and laid out.
      requestAnimationFrame(() => {
        const selector = '.' + CSS.escape(panelClass);
        const target =
          notebook?.node.querySelector(selector) ?? document.querySelector(selector);
        target?.scrollIntoView({ behavior: 'smooth', block: 'center' });
      });
    };

    const notify = (bridge: KernelBridge, event: IPhaseEndNotice) => {
      const notice: INotice = phaseEndNotice(event);
      const actions = notice.actions.map(action =>
        action === 'rollback'
          ? {
              label: 'Roll back to best',
              callback: () => void bridge.send('rollback', event.session)
            }
          : {
              label: 'Show panel',
              callback: () => showPanel(bridge, event.panel_class ?? '')
            }
      );
      // A toast that stays would cover the notebook; the notification centre keeps it
      // with its actions. A failure stays until dismissed.
      Notification.emit(notice.text, notice.kind, {
        autoClose: notice.kind === 'error' ? false : NOTICE_MS,
        actions
      });
    };

    app.commands.addCommand(CommandIDs.stopAll, {
      label: 'Fine-tuning: stop all sessions',
      caption: "Stop every running fine-tuning session of the active notebook's kernel",
      isEnabled: () => (activeBridge()?.model.sessions.length ?? 0) > 0,
      execute: () => activeBridge()?.send('stop_all')
    });
    app.commands.addCommand(CommandIDs.insertPanel, {
      label: 'Fine-tuning: insert a panel for a model…',
      caption: 'Insert a cell below the active one that shows a fine-tuning panel',
      isEnabled: () => tracker.currentWidget !== null,
      execute: async () => {
        const result = await InputDialog.getText({
          title: 'Insert a fine-tuning panel',
          label: 'The variable that holds the Keras model:',
          placeholder: 'model',
          text: 'model'
        });
        const model = result.value?.trim();
        if (!result.button.accept || !model) {
          return;
        }
        if (!/^[A-Za-z_][\w.]*$/.test(model)) {
          Notification.warning(`"${model}" is not a Python name.`, { autoClose: 5000 });
          return;
        }
        await app.commands.execute('notebook:insert-cell-below');
        tracker.activeCell?.model.sharedModel.setSource(panelCell(model));
      }
    });
    // Notebook 7 has no status bar to click: the palette opens the sidebar there.
    app.commands.addCommand(CommandIDs.showSidebar, {
      label: 'Fine-tuning: show the sessions sidebar',
      execute: () => app.shell.activateById(sidebar.id)
    });
    palette?.addItem({ command: CommandIDs.showSidebar, category: 'Fine-tuning' });
    palette?.addItem({ command: CommandIDs.stopAll, category: 'Fine-tuning' });
    palette?.addItem({ command: CommandIDs.insertPanel, category: 'Fine-tuning' });

    // Last, once the commands exist (showActive refreshes one). Every notebook's
    // kernel gets a bridge, so a kernel that already runs ftwidgets (a reloaded
    // page, a notebook in the background) is found.
    tracker.widgetAdded.connect((_, panel) => {
      bridgeFor(panel.sessionContext.session?.kernel);
      panel.sessionContext.kernelChanged.connect((_, change) => {
        bridgeFor(change.newValue);
        if (panel === tracker.currentWidget) {
          showActive();
        }
      });
    });
    tracker.forEach(panel => bridgeFor(panel.sessionContext.session?.kernel));
    tracker.currentChanged.connect(showActive);
    showActive();
  }
};

/** The inserted cell: replace the placeholders with your arrays. */
function panelCell(model: string): string {
  return [
    '%load_ext ftwidgets',
    '# x_train, y_train (and x_val, y_val) are placeholders: use your arrays',
    `%finetune ${model} --train x_train y_train --val x_val y_val`
  ].join('\n');
}

export default plugin;

/**
 * Put the item in the status bar, where the front end has one. The status bar's
 * package is imported only here: a host that does not share it (Voila) would
 * otherwise fail to load the whole extension, and bundling a fallback copy would make
 * the build depend on where it runs.
 */
async function addStatusItem(app: JupyterFrontEnd, status: FineTuningStatus): Promise<void> {
  try {
    const { IStatusBar } = await import('@jupyterlab/statusbar');
    const statusBar = await app.resolveOptionalService(IStatusBar);
    statusBar?.registerStatusItem('ftwidgets:status', {
      item: status,
      align: 'left',
      rank: 5,
      isActive: () => status.hasSession,
      activeStateChanged: status.activeChanged
    });
  } catch (reason) {
    console.info('ftwidgets: no status bar here', reason);
  }
}
