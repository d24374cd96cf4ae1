// The dependency page: which agency called which through the broker in a time window, as a
// graph (nodes on a circle, so the picture does not move between reloads) and as a table.

import { fetchAgencyCalls } from './api.js';
import { h, svg } from './dom.js';
import { DEFAULT_LOOKBACK, LOOKBACKS, lookbackLabel, lookbackMs, searchUrl } from './filters.js';
import { formatPercent, plural, serviceColour, serviceHue } from './format.js';
import { navigate, reportError } from './shell.js';

const WIDTH = 900;
const HEIGHT = 520;
const NODE_RADIUS = 28;

/** Agencies evenly on a circle, in name order: the same agencies always land in the same place. */
export function circleLayout(names, width = WIDTH, height = HEIGHT) {
  const centre = { x: width / 2, y: height / 2 };
  if (names.length === 1) return new Map([[names[0], centre]]);
  const radius = Math.min(width, height) / 2 - 90;
  // Two agencies side by side read better than one above the other.
  const first = names.length === 2 ? Math.PI : -Math.PI / 2;
  return new Map(names.map((name, i) => {
    const angle = first + (2 * Math.PI * i) / names.length;
    return [name, { x: centre.x + radius * Math.cos(angle), y: centre.y + radius * Math.sin(angle) }];
  }));
}

function edgeGeometry(from, to, curved) {
  if (from === to) {
    // A call from an agency to itself: a loop above the node.
    const { x, y } = from;
    const top = y - NODE_RADIUS;
    return {
      path: `M ${x - 10} ${top + 2} C ${x - 45} ${top - 70}, ${x + 45} ${top - 70}, ${x + 10} ${top + 2}`,
      label: { x, y: top - 62 },
    };
  }
  const dx = to.x - from.x;
  const dy = to.y - from.y;
  const length = Math.hypot(dx, dy);
  const ux = dx / length;
  const uy = dy / length;
  // Stop at the node's rim (plus room for the arrow head), not at its centre.
  const start = { x: from.x + ux * NODE_RADIUS, y: from.y + uy * NODE_RADIUS };
  const end = { x: to.x - ux * (NODE_RADIUS + 4), y: to.y - uy * (NODE_RADIUS + 4) };
  // Calls both ways between two agencies: bend each edge to its own side so both stay visible.
  const bend = curved ? 40 : 0;
  const control = { x: (start.x + end.x) / 2 - uy * bend, y: (start.y + end.y) / 2 + ux * bend };
  // The label sits a third of the way from the consumer, not at the middle: in a circle
  // layout, crossing edges meet at the centre and their labels would overlap there.
  const t = 0.35;
  const along = (a, b, c) => (1 - t) ** 2 * a + 2 * (1 - t) * t * b + t ** 2 * c;
  return {
    path: `M ${start.x} ${start.y} Q ${control.x} ${control.y} ${end.x} ${end.y}`,
    label: { x: along(start.x, control.x, end.x), y: along(start.y, control.y, end.y) - 8 },
  };
}

function edgeText(edge) {
  const calls = plural(edge.callCount, 'call');
  return edge.errorCount ? `${calls} · ${formatPercent(edge.errorRate)} errors` : calls;
}

function graph(edges, tracesUrl) {
  const names = [...new Set(edges.flatMap((e) => [e.consumer, e.provider]))].sort();
  const at = circleLayout(names);
  const pairs = new Set(edges.map((e) => `${e.consumer}\u0000${e.provider}`));
  const maxCalls = Math.max(...edges.map((e) => e.callCount));

  const edgeElements = edges.map((edge) => {
    const reverse = edge.consumer !== edge.provider && pairs.has(`${edge.provider}\u0000${edge.consumer}`);
    const { path, label } = edgeGeometry(at.get(edge.consumer), at.get(edge.provider), reverse);
    const width = 1.5 + 3.5 * (Math.log1p(edge.callCount) / Math.log1p(maxCalls));
    const href = tracesUrl(edge);
    const link = svg('a', {
      href,
      class: edge.errorCount ? 'edge has-errors' : 'edge',
      dataset: { consumer: edge.consumer, provider: edge.provider },
      'aria-label': `${edge.consumer} → ${edge.provider}: ${edgeText(edge)}. Show these traces`,
    },
    svg('title', {}, `${edge.consumer} → ${edge.provider}: ${edgeText(edge)}`),
    svg('path', { d: path, class: 'edge-hit' }),
    svg('path', { d: path, class: 'edge-line', 'stroke-width': width, 'marker-end': `url(#arrow${edge.errorCount ? '-error' : ''})` }),
    svg('text', { x: label.x, y: label.y, class: 'edge-label', 'text-anchor': 'middle' }, edgeText(edge)));
    return link;
  });

  const nodes = names.map((name) => {
    const { x, y } = at.get(name);
    return svg('g', { class: 'node', dataset: { agency: name } },
      svg('circle', { cx: x, cy: y, r: NODE_RADIUS, fill: `hsl(${serviceHue(name)} 70% 94%)`, stroke: serviceColour(name) }),
      svg('text', { x, y: y + NODE_RADIUS + 18, 'text-anchor': 'middle', class: 'node-label' }, name));
  });

  const arrow = (id) => svg('marker', {
    id, viewBox: '0 0 10 10', refX: '8', refY: '5', markerWidth: '12', markerHeight: '12', orient: 'auto', markerUnits: 'userSpaceOnUse',
  }, svg('path', { d: 'M 0 0 L 10 5 L 0 10 z' }));

  return svg('svg', {
    class: 'dependency-graph', viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: 'group', 'aria-label': 'Agency dependency graph',
  },
  svg('defs', {}, arrow('arrow'), arrow('arrow-error')),
  svg('g', { class: 'edges' }, edgeElements),
  svg('g', { class: 'nodes' }, nodes));
}

function edgeTable(edges, tracesUrl, window) {
  const sorted = [...edges].sort((a, b) => b.callCount - a.callCount || a.consumer.localeCompare(b.consumer));
  return h('table', { class: 'edges-table' },
    h('caption', {}, `Calls between agencies, ${window}`),
    h('thead', {}, h('tr', {},
      h('th', { scope: 'col' }, 'Consumer'),
      h('th', { scope: 'col' }, 'Provider'),
      h('th', { scope: 'col', class: 'num' }, 'Calls'),
      h('th', { scope: 'col', class: 'num' }, 'Errors'),
      h('th', { scope: 'col', class: 'num' }, 'Error rate'),
      h('th', { scope: 'col' }, h('span', { class: 'visually-hidden' }, 'Traces')))),
    h('tbody', {}, sorted.map((edge) => h('tr', { class: edge.errorCount ? 'has-errors' : undefined },
      h('td', {}, edge.consumer),
      h('td', {}, edge.provider),
      h('td', { class: 'num' }, edge.callCount.toLocaleString()),
      h('td', { class: 'num' }, edge.errorCount.toLocaleString()),
      h('td', { class: 'num' }, formatPercent(edge.errorRate)),
      h('td', {}, h('a', { href: tracesUrl(edge) }, 'Traces'))))));
}

export async function renderDependencies(view, { signal, params }) {
  const lookback = LOOKBACKS.some(([value]) => value === params.get('lookback')) ? params.get('lookback') : DEFAULT_LOOKBACK;
  const windowSelect = h('select', { id: 'd-window' }, LOOKBACKS.map(([value, label]) => h('option', { value }, label)));
  windowSelect.value = lookback;
  windowSelect.addEventListener('change', () => navigate(`/dependencies?lookback=${windowSelect.value}`));
  const body = h('div', { class: 'dependencies-body', 'aria-busy': 'true' }, h('p', { class: 'loading' }, 'Loading…'));
  view.append(h('div', { class: 'dependencies-page' },
    h('div', { class: 'page-head' },
      h('h1', {}, 'Agency dependencies'),
      h('div', { class: 'inline-field' },
        h('label', { for: 'd-window' }, 'Window'), windowSelect,
        h('button', { type: 'button', class: 'secondary', onclick: () => navigate(location.href, { replace: true }) }, 'Refresh'))),
    h('p', { class: 'muted' }, 'Consumer agency → provider agency, counted from the broker’s spans. Click an edge to see its traces.'),
    body));

  const endTs = Date.now();
  const windowMs = lookbackMs(lookback);
  // Traces over exactly the window the graph counted, so the numbers can be checked.
  const tracesUrl = (edge) => searchUrl({
    tags: JSON.stringify({ consumer: edge.consumer, provider: edge.provider }),
    lookback: 'custom',
    start: (endTs - windowMs) * 1000,
    end: endTs * 1000,
  });
  try {
    const edges = await fetchAgencyCalls({ endTs, lookback: windowMs }, signal);
    if (!edges.length) {
      body.replaceChildren(h('p', { class: 'empty' }, `No calls between agencies in the ${lookbackLabel(lookback)}.`));
      return;
    }
    body.replaceChildren(
      h('div', { class: 'graph-frame' }, graph(edges, tracesUrl),
        h('ul', { class: 'graph-key', 'aria-hidden': 'true' },
          h('li', {}, h('span', { class: 'key-line' }), 'calls'),
          h('li', {}, h('span', { class: 'key-line has-errors' }), 'calls with errors'))),
      edgeTable(edges, tracesUrl, lookbackLabel(lookback)));
  } catch (error) {
    body.replaceChildren(h('p', { class: 'empty' }, 'The dependencies could not be loaded; see the message above.'));
    reportError(error, signal);
  } finally {
    body.removeAttribute('aria-busy');
  }
}
