// The viewer's entry point: client-side routing. The server answers every page path with
// index.html, and this module decides from the path which page to draw.

import { renderAccess } from './access.js';
import { fetchWhoami } from './api.js';
import { renderDashboard } from './dashboard.js';
import { renderDependencies } from './dependencies.js';
import { h } from './dom.js';
import { renderReports } from './reports.js';
import { renderSearch } from './search.js';
import { clearError, navigate, reportError, setRenderer } from './shell.js';
import { renderTrace } from './trace.js';

// What each tab shows, in the server's terms (access.py): any one of these rights opens it.
const NAV_NEEDS = {
  search: ['spans'],
  dependencies: ['spans'],
  dashboard: ['ledger'],
  reports: ['ledger'],
  access: ['access', 'audit'],
};

const ROUTES = [
  { path: /^\/(?:search\/?)?$/, nav: 'search', title: 'Search', render: (view, _, ctx) => renderSearch(view, ctx) },
  { path: /^\/trace\/([^/]+)\/?$/, nav: 'search', title: 'Trace', render: (view, m, ctx) => renderTrace(view, decodeURIComponent(m[1]), ctx) },
  { path: /^\/dependencies\/?$/, nav: 'dependencies', title: 'Dependencies', render: (view, _, ctx) => renderDependencies(view, ctx) },
  { path: /^\/dashboard\/?$/, nav: 'dashboard', title: 'Dashboard', render: (view, _, ctx) => renderDashboard(view, ctx) },
  // Only the list: /reports/quarterly-….html is a page the server renders, loaded by the browser.
  { path: /^\/reports\/?$/, nav: 'reports', title: 'Reports', render: (view, _, ctx) => renderReports(view, ctx) },
  { path: /^\/access\/?$/, nav: 'access', title: 'Access', render: (view, _, ctx) => renderAccess(view, ctx) },
];

let current = null;

async function render() {
  // A page still loading for the previous address must not draw over this one.
  current?.abort();
  const controller = new AbortController();
  current = controller;
  clearError();

  const route = ROUTES.find((r) => r.path.test(location.pathname));
  for (const link of document.querySelectorAll('[data-nav]')) {
    if (route && link.dataset.nav === route.nav) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  // Each render draws into its own element: late results of a cancelled render land in a
  // detached element instead of the page.
  const view = h('div', { class: 'view' });
  document.getElementById('main').replaceChildren(view);
  if (!route) {
    document.title = 'Not found · Tabadol ops';
    view.append(h('div', { class: 'empty-page' }, h('h1', {}, 'Page not found'),
      h('p', {}, h('a', { href: '/search' }, 'Search for traces'))));
    return;
  }
  document.title = `${route.title} · Tabadol ops`;
  if (route.nav === 'search' && route.title === 'Search') {
    // The Search tab returns to the last search rather than to an empty form.
    document.querySelector('[data-nav=search]').setAttribute('href', location.pathname + location.search);
  }
  const ctx = { signal: controller.signal, params: new URLSearchParams(location.search) };
  try {
    await route.render(view, route.path.exec(location.pathname), ctx);
  } catch (error) {
    reportError(error, controller.signal);
  }
}

/** Follow links to viewer pages in place; leave downloads, new tabs and the API to the browser. */
function onClick(event) {
  if (event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
  const link = event.target.closest('a');
  if (!link || link.hasAttribute('download') || (link.getAttribute('target') ?? '_self') !== '_self') return;
  const href = link.getAttribute('href'); // SVG links have no string .href property
  if (!href) return;
  const url = new URL(href, location.href);
  if (url.origin !== location.origin || !ROUTES.some((r) => r.path.test(url.pathname))) return;
  event.preventDefault();
  navigate(url.pathname + url.search);
}

/** Say who is logged in and hide the tabs they may not open; an auditor starts on the dashboard. */
async function showViewer() {
  let viewer;
  try {
    viewer = await fetchWhoami();
  } catch (error) {
    reportError(error);
    return;
  }
  const el = document.getElementById('whoami');
  el.textContent = `Logged in as ${viewer.label}`;
  el.title = `by ${viewer.via}, until ${viewer.expires}`;
  for (const link of document.querySelectorAll('[data-nav]')) {
    link.hidden = !NAV_NEEDS[link.dataset.nav].some((right) => viewer.may.includes(right));
  }
  if (!viewer.may.includes('spans') && location.pathname === '/') {
    history.replaceState(null, '', '/dashboard');
  }
}

document.querySelector('.banner-close').addEventListener('click', clearError);
document.addEventListener('click', onClick);
window.addEventListener('popstate', render);
setRenderer(render);
showViewer().then(render);
