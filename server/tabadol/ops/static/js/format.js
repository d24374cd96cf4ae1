// How times, durations, rates and services look everywhere in the viewer.
// The API speaks microseconds since the epoch; people read local time.

import { h } from './dom.js';

const pad = (n, width = 2) => String(n).padStart(width, '0');

/** A number with at most three significant digits, without trailing zeros. */
function short(value) {
  const digits = value >= 100 ? 0 : value >= 10 ? 1 : 2;
  return String(Number(value.toFixed(digits)));
}

/** 850µs, 12.5ms, 1.25s, 2m 5s, 1h 3m: the unit a person would pick. */
export function formatDuration(us) {
  if (!Number.isFinite(us)) return '–';
  if (us < 1_000) return `${Math.round(us)}µs`;
  if (us < 1_000_000) return `${short(us / 1_000)}ms`;
  if (us < 60_000_000) return `${short(us / 1_000_000)}s`;
  const seconds = Math.round(us / 1_000_000);
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ${seconds % 60}s`;
  return `${Math.floor(seconds / 3600)}h ${Math.floor((seconds % 3600) / 60)}m`;
}

/** 0.5 → "50%", 0.083 → "8.3%"; tiny non-zero rates stay visible instead of rounding to 0%. */
export function formatPercent(rate) {
  const percent = rate * 100;
  if (percent === 0) return '0%';
  if (percent < 0.1) return '<0.1%';
  return `${percent < 10 ? Number(percent.toFixed(1)) : Math.round(percent)}%`;
}

export function plural(count, one, many = `${one}s`) {
  return `${count.toLocaleString()} ${count === 1 ? one : many}`;
}

function stamp(date, utc) {
  const get = (name) => date[`get${utc ? 'UTC' : ''}${name}`]();
  return (
    `${get('FullYear')}-${pad(get('Month') + 1)}-${pad(get('Date'))} ` +
    `${pad(get('Hours'))}:${pad(get('Minutes'))}:${pad(get('Seconds'))}.${pad(get('Milliseconds'), 3)}`
  );
}

export const localTimestamp = (us) => stamp(new Date(us / 1000), false);
export const utcTimestamp = (us) => `${stamp(new Date(us / 1000), true)} UTC`;

/** A <time> in local time; the UTC time is one hover away for comparing with logs. */
export function timeElement(us) {
  const date = new Date(us / 1000);
  return h('time', { datetime: date.toISOString(), title: utcTimestamp(us) }, localTimestamp(us));
}

/** A datetime-local input's value (local time, to the second) for a time in µs. */
export function toDatetimeLocal(us) {
  return localTimestamp(us).slice(0, 19).replace(' ', 'T');
}

/** µs for a datetime-local value; the browser parses a date-time without offset as local. */
export function fromDatetimeLocal(value) {
  const ms = new Date(value).getTime();
  return Number.isNaN(ms) ? null : ms * 1000;
}

// FNV-1a: a tiny stable hash, so a service keeps its colour across pages, traces and reloads.
function hash(text) {
  let value = 0x811c9dc5;
  for (let i = 0; i < text.length; i += 1) {
    value ^= text.charCodeAt(i);
    value = Math.imul(value, 0x01000193);
  }
  value ^= value >>> 15; // mix the high bits down: similar names should not get similar hues
  value = Math.imul(value, 0x2c1b3c6d);
  value ^= value >>> 12;
  return value >>> 0;
}

/** A hue per service name, kept out of the reds so that red always means an error. */
export function serviceHue(name) {
  return 30 + (hash(name) % 300);
}

export const serviceColour = (name) => `hsl(${serviceHue(name)} 60% 44%)`;

/**
 * `tabadol.agencies.nocr.v1.PersonRegistry/InquirePerson` as `PersonRegistry/InquirePerson`:
 * the package repeats on every row and pushes the method out of sight. The title and the
 * details keep the full name.
 */
export function shortOperation(name) {
  const grpc = /^[\w.]+\.([\w]+\/[\w]+)$/.exec(name);
  return grpc ? grpc[1] : name;
}

/** A service name as a small coloured badge. */
export function serviceBadge(name) {
  return h('span', { class: 'badge', style: { '--hue': serviceHue(name) } }, name);
}

export function swatch(name) {
  return h('span', { class: 'swatch', style: { background: serviceColour(name) }, 'aria-hidden': 'true' });
}
