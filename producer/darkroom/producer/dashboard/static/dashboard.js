// Darkroom dashboard: live updates over server-sent events (GET /events) and the two actions.
// Job events are the ones the SDK waits on (Redis channel darkroom:events); "fleet", "queues",
// "augment" and "webhooks" say that view changed. A changed region is re-read from the page's own
// URL and swapped in place: the page is never reloaded.
(() => {
  "use strict";
  const body = document.body;
  const page = body.dataset.page;
  const csrf = document.querySelector('meta[name="csrf"]').content;
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const latest = new Map(); // job id -> its newest lifecycle event
  const trails = new Map(); // job id -> statuses seen live, in order
  const steps = new Map(); // job id -> progress events seen live

  // -- refreshing regions ------------------------------------------------------
  const pending = new Set();
  let timer = null;
  let inFlight = false;

  function refresh(regionId) {
    if (!document.getElementById(regionId)) return;
    pending.add(regionId);
    if (!timer) timer = setTimeout(flush, 250);
  }

  async function flush() {
    timer = null;
    if (inFlight) { timer = setTimeout(flush, 250); return; }
    const ids = [...pending];
    pending.clear();
    inFlight = true;
    try {
      const response = await fetch(location.href, { headers: { Accept: "text/html" }, cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
      for (const id of ids) {
        const now = document.getElementById(id);
        const next = fresh.getElementById(id);
        if (now && next) now.replaceWith(document.adoptNode(next));
      }
      for (const event of latest.values()) applyStatus(event);
      tick();
    } catch (error) {
      notice(`could not refresh: ${error.message}`);
    } finally {
      inFlight = false;
    }
  }

  function refreshLiveRegions(kind) {
    document.querySelectorAll("[data-live-region]").forEach((el) => {
      if (kind === "*" || el.dataset.liveRegion.split(" ").includes(kind)) refresh(el.id);
    });
  }

  // -- job events ---------------------------------------------------------------
  function applyStatus(event) {
    document.querySelectorAll(`[data-job-status="${CSS.escape(event.job_id)}"]`).forEach((el) => {
      const shown = Date.parse(el.dataset.updated || 0);
      if (Date.parse(event.time) >= shown) {
        el.textContent = event.status;
        el.className = `status status-${event.status}`;
        el.dataset.updated = event.time;
      }
      el.dataset.trail = (trails.get(event.job_id) || []).join(" ");
      el.dataset.progressEvents = String(steps.get(event.job_id) || 0);
    });
    document.querySelectorAll(`[data-job-progress="${CSS.escape(event.job_id)}"]`).forEach((el) => {
      el.hidden = event.status !== "started";
    });
  }

  function onProgress(event) {
    document.querySelectorAll(`[data-job-progress="${CSS.escape(event.job_id)}"]`).forEach((el) => {
      el.hidden = false;
      const bar = el.querySelector("progress");
      bar.max = event.total_steps || 1;
      bar.value = event.step || 0;
      el.querySelector("small").textContent = `step ${event.step}/${event.total_steps}`;
    });
  }

  function logEvent(event) {
    const list = document.getElementById("live-events");
    if (!list || event.job_id !== body.dataset.job) return;
    list.querySelector(".muted")?.remove();
    const item = document.createElement("li");
    const time = document.createElement("time");
    time.textContent = new Date(event.time).toISOString().replace("T", " ").slice(0, 23);
    item.append(time, ` ${event.type}`);
    if (event.type === "progress") item.append(` ${event.step}/${event.total_steps}`);
    if (event.worker && event.type === "started") item.append(` on ${event.worker}`);
    if (event.error_code) item.append(` [${event.error_code}] ${event.error_message || ""}`);
    list.append(item);
    while (list.children.length > 60) list.firstElementChild.remove();
  }

  function onJob(event) {
    logEvent(event);
    if (event.type === "progress") {
      steps.set(event.job_id, (steps.get(event.job_id) || 0) + 1);
      onProgress(event);
      return;
    }
    const trail = trails.get(event.job_id) || [];
    if (trail[trail.length - 1] !== event.status) trail.push(event.status);
    trails.set(event.job_id, trail);
    latest.set(event.job_id, event);
    applyStatus(event);
    const terminal = TERMINAL.has(event.status);
    if (page === "jobs" && (terminal || !document.querySelector(`[data-job="${CSS.escape(event.job_id)}"]`))) refresh("jobs");
    if (page === "job" && event.job_id === body.dataset.job) refresh("job");
    if (page === "gallery" && event.status === "succeeded") refresh("gallery");
    if (page === "queues") refresh("queues");
  }

  // -- the event stream ---------------------------------------------------------
  function connect() {
    const source = new EventSource("/events");
    const status = (state) => {
      body.dataset.live = state;
      const text = document.querySelector(".live-text");
      if (text) text.textContent = state;
    };
    source.addEventListener("hello", () => status("connected"));
    source.addEventListener("job", (message) => onJob(JSON.parse(message.data)));
    for (const kind of ["fleet", "queues", "augment", "webhooks"]) {
      source.addEventListener(kind, () => refreshLiveRegions(kind));
    }
    source.addEventListener("resync", () => refreshLiveRegions("*"));
    source.onerror = () => status(source.readyState === EventSource.CLOSED ? "offline" : "reconnecting");
    source.onopen = () => status("connected");
  }

  // -- actions ------------------------------------------------------------------
  document.addEventListener("click", async (click) => {
    const button = click.target.closest("button[data-action]");
    if (!button) return;
    if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
    button.disabled = true;
    try {
      const response = await fetch(button.dataset.url, { method: "POST", headers: { "X-Darkroom-CSRF": csrf } });
      const answer = await response.json().catch(() => ({}));
      if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
      notice(button.dataset.action === "cancel" ? `job ${answer.job_id}: ${answer.status}` : `webhook ${answer.webhook_id} queued again`);
      if (button.dataset.action === "replay") { refresh("webhooks"); refresh("job"); }
    } catch (error) {
      notice(`${button.dataset.action} failed: ${error.message}`);
      button.disabled = false;
    }
  });

  function notice(text) {
    const el = document.getElementById("notice");
    el.textContent = text;
    el.hidden = false;
  }

  // -- relative times -----------------------------------------------------------
  function ago(seconds) {
    if (seconds < 90) return `${Math.round(seconds)} s ago`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
    if (seconds < 36 * 3600) return `${(seconds / 3600).toFixed(1)} h ago`;
    return `${(seconds / 86400).toFixed(1)} d ago`;
  }

  function tick() {
    const now = Date.now() / 1000;
    document.querySelectorAll("[data-ago]").forEach((el) => {
      const at = parseFloat(el.dataset.ago);
      if (at) el.textContent = ago(Math.max(0, now - at));
    });
  }

  // -- images: mark loaded ones (tests and screenshots wait for data-loaded) --------
  function markLoaded(img) {
    if (img.complete) img.dataset.loaded = img.naturalWidth > 0 ? "1" : "error";
  }
  document.addEventListener("load", (e) => { if (e.target.tagName === "IMG") markLoaded(e.target); }, true);
  document.addEventListener("error", (e) => { if (e.target.tagName === "IMG") e.target.dataset.loaded = "error"; }, true);
  document.querySelectorAll("img").forEach(markLoaded);

  setInterval(tick, 1000);
  connect();
})();
