// What every page shares: the error banner and client-side navigation.
// Pages import from here rather than from app.js, so that app.js can import the pages.

const banner = () => document.getElementById('banner');

/** Show a message in the banner at the top of the page (role=alert, so it is announced). */
export function showError(message) {
  const el = banner();
  el.querySelector('.banner-message').textContent = message;
  el.hidden = false;
}

export function clearError() {
  banner().hidden = true;
}

/** Show an error unless it only means "the page changed and this request was cancelled". */
export function reportError(error, signal) {
  if (error?.name === 'AbortError' || signal?.aborted) return;
  console.error(error);
  showError(error?.message || String(error));
}

let render = () => {};

export function setRenderer(fn) {
  render = fn;
}

/** Go to a URL inside the viewer without reloading; replace=true keeps Back for the old page. */
export function navigate(url, { replace = false } = {}) {
  const target = new URL(url, location.href);
  const same = target.pathname + target.search === location.pathname + location.search;
  // Submitting an unchanged search should refresh the results, not add a duplicate Back step.
  history[replace || same ? 'replaceState' : 'pushState'](null, '', target);
  if (!replace && !same) window.scrollTo(0, 0);
  render();
}
