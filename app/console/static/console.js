// The console's only script: live updates, text set with textContent only.
//
// A page opts in with <body data-live="URL">: URL answers the page's live values as JSON. Each
// element with data-live-key="K" gets value K as its text (never as HTML); an element with
// data-status follows its text, so the stylesheet can colour it; an element with
// data-show-when="A B" is shown only while the page's "status" is A or B; values.tables.T
// holds the rows of <table data-live-table="T">, in the router's row shape (router.table_row,
// laid out as templates/rows.html does).
//
// When values are read again: with <body data-events="STREAM">, on each event of the
// console's event stream (a task the page may show changed), at most twice a second, and
// after the stream (re)connects; besides, every data-live-every ms (default 30 s) for what no
// task event tells, such as worker heartbeats. Without a stream (or an EventSource), every
// 1.5 s. The browser reconnects a dropped stream itself, resuming with Last-Event-ID.
"use strict";

(function () {
  const POLL_MS = 1500;
  const FALLBACK_MS = 30000;
  const MIN_GAP_MS = 500;
  const CHART_EVERY_MS = 10000;
  const body = document.body;
  const url = body.dataset.live;
  const stream = body.dataset.events;
  const stats = { events: 0, refreshes: 0 };
  let chartAt = Date.now();

  function apply(values) {
    document.querySelectorAll("[data-live-key]").forEach(function (element) {
      const key = element.dataset.liveKey;
      if (!Object.prototype.hasOwnProperty.call(values, key)) {
        return;
      }
      const text = String(values[key]);
      if (element.textContent !== text) {
        element.textContent = text;
      }
      if (element.dataset.status !== undefined) {
        element.dataset.status = text;
      }
    });
    if (typeof values.status === "string") {
      document.querySelectorAll("[data-show-when]").forEach(function (element) {
        element.hidden = element.dataset.showWhen.split(" ").indexOf(values.status) < 0;
      });
    }
    if (values.tables && typeof values.tables === "object") {
      Object.keys(values.tables).forEach(function (name) {
        const table = document.querySelector('table[data-live-table="' + CSS.escape(name) + '"]');
        if (table && Array.isArray(values.tables[name])) {
          renderTable(table, values.tables[name]);
        }
      });
    }
    const chart = document.getElementById("chart");
    if (chart && chart.dataset.refresh !== undefined && Date.now() - chartAt >= CHART_EVERY_MS) {
      chartAt = Date.now();
      chart.src = "/console/chart.svg?t=" + chartAt;
    }
  }

  function renderCell(cell) {
    const td = document.createElement("td");
    let inner = td;
    // Links only inside the console: the router makes them, this keeps it so.
    if (typeof cell.href === "string" && cell.href.indexOf("/console/") === 0) {
      inner = document.createElement("a");
      inner.href = cell.href;
      td.appendChild(inner);
    } else if (typeof cell.status === "string") {
      inner = document.createElement("span");
      inner.className = "status";
      inner.dataset.status = cell.status;
      td.appendChild(inner);
    }
    if (typeof cell.class === "string") {
      inner.className = cell.class;
    }
    inner.textContent = String(cell.text);
    return td;
  }

  // A table's rows, laid out again from text: a task new since the page loaded appears at
  // the top of the list, every status and attempt follows the record.
  function renderTable(table, rows) {
    const tbody = table.tBodies[0];
    const fresh = rows.map(function (row) {
      const tr = document.createElement("tr");
      Object.keys(row.data || {}).forEach(function (name) {
        tr.dataset[name] = String(row.data[name]);
      });
      row.cells.forEach(function (cell) {
        tr.appendChild(renderCell(cell));
      });
      return tr;
    });
    if (fresh.length === 0) {
      const tr = document.createElement("tr");
      const td = document.createElement("td");
      td.colSpan = table.tHead.rows[0].cells.length;
      td.textContent = table.dataset.empty || "";
      tr.appendChild(td);
      fresh.push(tr);
    }
    tbody.replaceChildren.apply(tbody, fresh);
  }

  let busy = false;
  let again = false;
  let timer = null;
  let lastStart = 0;

  async function refresh() {
    if (busy) {
      again = true;
      return;
    }
    if (document.visibilityState !== "visible") {
      return;
    }
    busy = true;
    lastStart = Date.now();
    stats.refreshes += 1;
    try {
      const response = await fetch(url, {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
        redirect: "error",
      });
      if (response.ok) {
        apply(await response.json());
        body.dataset.liveState = "ok";
      } else {
        body.dataset.liveState = "error";
      }
    } catch (error) {
      body.dataset.liveState = "error";
    } finally {
      busy = false;
      if (again) {
        again = false;
        soon();
      }
    }
  }

  // Many events in a burst make one read, at most one every MIN_GAP_MS.
  function soon() {
    if (timer !== null) {
      return;
    }
    const wait = Math.max(0, lastStart + MIN_GAP_MS - Date.now());
    timer = window.setTimeout(function () {
      timer = null;
      refresh();
    }, wait);
  }

  function follow() {
    const source = new EventSource(stream);
    body.dataset.stream = "connecting";
    source.onopen = function () {
      body.dataset.stream = "open";
      soon();
    };
    source.onmessage = function () {
      stats.events += 1;
      soon();
    };
    source.onerror = function () {
      body.dataset.stream = "reconnecting";
    };
    window.setInterval(soon, Number(body.dataset.liveEvery) || FALLBACK_MS);
  }

  if (url) {
    if (stream && window.EventSource) {
      follow();
    } else {
      window.setInterval(refresh, POLL_MS);
    }
    document.addEventListener("visibilitychange", soon);
  }
  window.taskdockConsole = { apply: apply, stats: stats };
})();
