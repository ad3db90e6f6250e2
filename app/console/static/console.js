// The console's only script: live updates by polling, text set with textContent only.
//
// A page opts in with <body data-live="URL">. URL answers a flat JSON object of strings; each
// element with data-live-key="K" gets value K as its text (never as HTML). An element with
// data-status follows its text, so the stylesheet can colour it; an element with
// data-show-when="A B" is shown only while the page's "status" is A or B; a "rows" list
// lays out the task list again, each cell's text set the same way. To move to a push
// stream later, call apply() with each event's object instead of polling.
"use strict";

(function () {
  const INTERVAL_MS = 1500;
  const body = document.body;
  const url = body.dataset.live;

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
    if (Array.isArray(values.rows)) {
      renderRows(values.rows);
    }
    const chart = document.getElementById("chart");
    if (chart && chart.dataset.refresh !== undefined) {
      chart.src = "/console/chart.svg?t=" + Date.now();
    }
  }

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) {
      td.className = className;
    }
    return td;
  }

  // The task list's rows, laid out again from text: a task new since the page loaded
  // appears at the top, every status and attempt follows the record.
  function renderRows(rows) {
    const body = document.querySelector("#task-list tbody");
    if (!body) {
      return;
    }
    const fresh = rows.map(function (row) {
      const tr = document.createElement("tr");
      tr.dataset.task = row.id;
      const idCell = document.createElement("td");
      const link = document.createElement("a");
      link.href = "/console/tasks/" + encodeURIComponent(row.id);
      link.className = "mono";
      link.textContent = row.id.slice(0, 12) + "\u2026";
      idCell.appendChild(link);
      const statusCell = document.createElement("td");
      const status = document.createElement("span");
      status.className = "status";
      status.dataset.status = row.status;
      status.textContent = row.status;
      statusCell.appendChild(status);
      tr.append(
        idCell,
        cell(row.type),
        statusCell,
        cell(row.queue),
        cell(row.attempt),
        cell(row.idempotency_key),
        cell(row.created),
        cell(row.finished)
      );
      return tr;
    });
    if (fresh.length === 0) {
      const tr = document.createElement("tr");
      const td = cell("No task matches.");
      td.colSpan = 8;
      tr.appendChild(td);
      fresh.push(tr);
    }
    body.replaceChildren.apply(body, fresh);
  }

  let busy = false;

  async function poll() {
    if (busy || document.visibilityState !== "visible") {
      return;
    }
    busy = true;
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
    }
  }

  if (url) {
    window.setInterval(poll, INTERVAL_MS);
    document.addEventListener("visibilitychange", poll);
  }
  window.taskdockConsole = { apply: apply };
})();
