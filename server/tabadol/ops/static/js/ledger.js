// What the pages over the broker's ledger (dashboard, reports) share: a viewer started
// without --config has no ledger, which is a way it was started, not an error to alarm about.

import { h } from './dom.js';

/** True when the API said there is no ledger to read (HTTP 404 from a ledger endpoint). */
export function isNoLedger(error) {
  return error?.name === 'ApiError' && error.status === 404;
}

/** The server's message, with `quoted` parts (the command to run) set as code. */
function withCode(message) {
  const sentence = message.charAt(0).toUpperCase() + message.slice(1);
  const text = /[.!?]$/.test(sentence) ? sentence : `${sentence}.`;
  return text.split('`').map((part, i) => (i % 2 ? h('code', {}, part) : part));
}

/** The friendly page shown instead of figures when the viewer has no ledger. */
export function noLedgerNotice(error) {
  return h('div', { class: 'empty-page no-ledger' },
    h('h2', {}, 'No ledger to read'),
    h('p', {}, withCode(error.message)));
}
