/* agentkeel cost dashboard.
 *
 * Asks for an admin API key (kept in this tab's sessionStorage; also taken from the
 * address's #key=... fragment, which is then removed from the address bar), fetches
 * /v1/dashboard with it and draws the numbers, the charts (the vendored Chart.js) and
 * the latest runs; a run's row expands to its steps (GET /v1/runs/{id}).
 *
 * Every text from the server goes into the page through textContent or an attribute,
 * never as HTML. Every request goes to this page's own origin.
 */
(function () {
  "use strict";

  var KEY_STORAGE = "agentkeel.dashboard.key";
  var PALETTE = ["#2f6fde", "#e8833a", "#3aa676", "#c2410c", "#7c5cd6", "#d4a017", "#1f9bb3", "#d6457a",
                 "#6b7280", "#4d7c0f"];
  var STATUS_COLOURS = {succeeded: "#3aa676", failed: "#d64545", aborted: "#b42318", degraded: "#d4a017",
                        waiting: "#e8833a", running: "#2f6fde", queued: "#7c5cd6", in_doubt: "#c2410c",
                        cancelled: "#6b7280", rolled_back: "#1f9bb3"};

  var state = {key: null, loading: 0, charts: {}, data: null};
  window.agentkeelDashboard = state; /* for the tests and the curious: the data and the Chart instances */

  function $(id) { return document.getElementById(id); }

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (name) {
        if (attrs[name] !== null && attrs[name] !== undefined) { node.setAttribute(name, String(attrs[name])); }
      });
    }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }

  function clear(node) { while (node.firstChild) { node.removeChild(node.firstChild); } }

  function money(value) {
    var n = Number(value);
    if (!isFinite(n)) { return "$" + String(value); }
    var text = Math.abs(n).toFixed(6);
    return (n < 0 && Number(text) !== 0 ? "-$" : "$") + text;
  }

  /* an axis tick: as few decimals as the amount needs */
  function tick(value) {
    var n = Number(value);
    return (n < 0 ? "-$" : "$") + String(parseFloat(Math.abs(n).toFixed(6)));
  }

  function count(value) { return String(Math.round(Number(value) || 0)); }

  function percent(value) {
    if (value === null || value === undefined) { return "n/a"; }
    return (Number(value) * 100).toFixed(1) + "%";
  }

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function when(seconds) {
    var d = new Date(Number(seconds) * 1000);
    if (isNaN(d.getTime())) { return ""; }
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
      pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }

  /* --- the key ------------------------------------------------------------------------ */

  function keyFromFragment() {
    var hash = window.location.hash;
    if (!hash || hash.length < 2) { return null; }
    var params = new URLSearchParams(hash.slice(1));
    var key = params.get("key");
    if (key === null) { return null; }
    /* the key must not stay in the address bar, the history or a bookmark */
    params.delete("key");
    var rest = params.toString();
    window.history.replaceState(null, "", window.location.pathname + window.location.search + (rest ? "#" + rest : ""));
    return key.trim() || null;
  }

  function storedKey() {
    try { return window.sessionStorage.getItem(KEY_STORAGE); } catch (e) { return null; }
  }

  function storeKey(key) {
    try {
      if (key) { window.sessionStorage.setItem(KEY_STORAGE, key); } else { window.sessionStorage.removeItem(KEY_STORAGE); }
    } catch (e) { /* storage disabled: the key lives in this page only */ }
    state.key = key || null;
  }

  function showForm(visible) {
    $("key-form").hidden = !visible;
    $("controls").hidden = visible;
    if (visible) { $("key-input").value = ""; }
  }

  /* --- requests ----------------------------------------------------------------------- */

  function problemText(response, body) {
    var detail = body && typeof body === "object" && typeof body.detail === "string" ? body.detail : "";
    var head;
    if (response.status === 401) {
      head = "The API key was refused (401).";
    } else if (response.status === 403) {
      head = "This API key may not open the dashboard (403): it needs a principal holding the admin permission.";
    } else if (response.status === 429) {
      head = "Too many requests (429): try again in a moment.";
    } else {
      head = "The server answered " + response.status + ".";
    }
    return detail ? head + " " + detail : head;
  }

  function getJSON(path) {
    return fetch(path, {
      headers: {"Authorization": "Bearer " + state.key, "Accept": "application/json"},
      cache: "no-store",
      credentials: "omit",
      referrerPolicy: "no-referrer"
    }).then(function (response) {
      return response.text().then(function (text) {
        var body = null;
        try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
        if (!response.ok) {
          var error = new Error(problemText(response, body));
          error.status = response.status;
          throw error;
        }
        return body;
      });
    });
  }

  /* --- messages ----------------------------------------------------------------------- */

  function showMessage(text) {
    var node = $("message");
    node.textContent = text || "";
    node.hidden = !text;
  }

  function showStatus(text) { $("status").textContent = text || ""; }

  /* --- loading ------------------------------------------------------------------------ */

  function dashboardPath() {
    var period = $("period").value;
    var path = "/v1/dashboard";
    if (period) {
      path += "?since=" + encodeURIComponent(String(Math.floor(Date.now() / 1000) - Number(period)));
    }
    return path;
  }

  function load() {
    if (!state.key) { showForm(true); return; }
    var ticket = ++state.loading;
    showMessage("");
    showStatus("Loading…");
    getJSON(dashboardPath()).then(function (data) {
      if (ticket !== state.loading) { return; }
      showForm(false);
      showStatus("");
      render(data);
    }, function (error) {
      if (ticket !== state.loading) { return; }
      blank();
      showStatus("");
      showMessage(error.message || String(error));
      if (error.status === 401 || error.status === 403) {
        storeKey(null);
        showForm(true);
      }
    });
  }

  /* --- drawing ------------------------------------------------------------------------ */

  function blank() {
    state.data = null;
    Object.keys(state.charts).forEach(function (name) { state.charts[name].destroy(); });
    state.charts = {};
    ["total-spend", "total-runs", "total-llm-calls", "total-tool-calls", "cascade-hit-rate", "cascade-saving"]
      .forEach(function (id) { $(id).textContent = ""; });
    ["legend-day", "legend-tier", "legend-model", "legend-tool", "legend-user", "legend-status", "runs-body"]
      .forEach(function (id) { clear($(id)); });
    $("generated").textContent = "";
    $("content").hidden = true;
  }

  function render(data) {
    blank();
    state.data = data;
    var totals = data.totals || {};
    var cascade = data.cascade || {};
    $("total-spend").textContent = money(totals.spend_usd);
    $("total-runs").textContent = count(totals.runs);
    $("total-llm-calls").textContent = count(totals.llm_calls);
    $("total-tool-calls").textContent = count(totals.tool_calls);
    $("cascade-hit-rate").textContent = percent(cascade.hit_rate);
    $("cascade-hit-rate").title = count(cascade.first_tier_runs) + " of " + count(cascade.runs) +
      " runs with LLM calls were served by the first tier alone";
    $("cascade-saving").textContent = money(cascade.saving_usd);
    $("content").hidden = false;

    var spend = data.spend || {};
    var days = spend.day || [];
    spendChart("day", days, "bar", false);
    spendChart("tier", spend.tier || [], "doughnut", false);
    spendChart("model", spend.model || [], "bar", true);
    spendChart("tool", spend.tool || [], "bar", true);
    spendChart("user", spend.user || [], "bar", true);
    statusChart((data.runs || {}).by_status || {});
    runsTable(data.latest_runs || []);

    var runs = data.runs || {};
    var foot = "Generated " + when(data.generated_at) + " · runs counted: " + count(runs.counted);
    if (runs.truncated) { foot += " (the newest " + count(runs.limit) + " only)"; }
    $("generated").textContent = foot;
  }

  function legend(group, items, format, prefix) {
    var list = $("legend-" + group);
    items.forEach(function (item) {
      var li = el("li");
      li.appendChild(el("span", {"class": "key", title: item.key}, item.key));
      li.appendChild(el("span", {"class": "amount", "data-testid": prefix + item.key}, format(item.value)));
      list.appendChild(li);
    });
    if (!items.length) { list.appendChild(el("li", null, "nothing in this period")); }
  }

  function makeChart(group, type, labels, values, colours, horizontal, format) {
    var canvas = $("chart-" + group);
    var circular = type === "doughnut";
    var options = {
      responsive: true,
      maintainAspectRatio: false,
      animation: false,
      plugins: {
        legend: {display: circular, position: "right", labels: {boxWidth: 12}},
        tooltip: {callbacks: {label: function (ctx) {
          var v = circular ? ctx.parsed : (horizontal ? ctx.parsed.x : ctx.parsed.y);
          return " " + format(v);
        }}}
      }
    };
    if (!circular) {
      options.indexAxis = horizontal ? "y" : "x";
      var valueAxis = {beginAtZero: true, ticks: {maxRotation: 0, autoSkipPadding: 12,
                                                   callback: function (v) { return format === money ? tick(v) : count(v); }}};
      options.scales = horizontal ? {x: valueAxis} : {y: valueAxis};
    }
    state.charts[group] = new window.Chart(canvas, {
      type: type,
      data: {labels: labels, datasets: [{label: group, data: values, backgroundColor: colours, borderWidth: circular ? 1 : 0}]},
      options: options
    });
  }

  function spendChart(group, rows, type, horizontal) {
    var labels = rows.map(function (row) { return String(row.key); });
    var values = rows.map(function (row) { return Number(row.cost_usd); });
    var colours = type === "doughnut" || horizontal
      ? labels.map(function (_, i) { return PALETTE[i % PALETTE.length]; })
      : PALETTE[0];
    makeChart(group, type, labels, values, colours, horizontal, money);
    legend(group, rows.map(function (row) { return {key: String(row.key), value: row.cost_usd}; }), money,
           "spend-" + group + "-");
  }

  function statusChart(byStatus) {
    var labels = Object.keys(byStatus);
    var values = labels.map(function (name) { return Number(byStatus[name]); });
    var colours = labels.map(function (name, i) { return STATUS_COLOURS[name] || PALETTE[i % PALETTE.length]; });
    makeChart("status", "doughnut", labels, values, colours, false, count);
    legend("status", labels.map(function (name) { return {key: name, value: byStatus[name]}; }), count,
           "runs-status-");
  }

  /* --- the runs table ----------------------------------------------------------------- */

  function runsTable(runs) {
    var body = $("runs-body");
    runs.forEach(function (run) {
      var id = String(run.run_id);
      var row = el("tr", {"class": "run", tabindex: "0", "aria-expanded": "false", "data-testid": "run-row-" + id,
                          "data-run-id": id});
      row.appendChild(el("td", {"class": "mono", "data-testid": "run-id-" + id, title: id}, id));
      var statusCell = el("td");
      statusCell.appendChild(el("span", {"class": "badge " + String(run.status), "data-testid": "run-status-" + id},
                                run.status));
      row.appendChild(statusCell);
      row.appendChild(el("td", {"data-testid": "run-user-" + id, title: run.user_id}, run.user_id));
      row.appendChild(el("td", {"data-testid": "run-created-" + id}, when(run.created_at)));
      row.appendChild(el("td", {"class": "num", "data-testid": "run-cost-" + id}, money(run.cost_usd)));
      row.appendChild(el("td", {title: run.message}, run.message));
      row.addEventListener("click", function () { toggle(row, run); });
      row.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); toggle(row, run); }
      });
      body.appendChild(row);
    });
    $("runs-empty").hidden = runs.length > 0;
  }

  function toggle(row, run) {
    var id = String(run.run_id);
    var next = row.nextSibling;
    if (next && next.classList && next.classList.contains("steps")) {
      next.parentNode.removeChild(next);
      row.setAttribute("aria-expanded", "false");
      return;
    }
    row.setAttribute("aria-expanded", "true");
    var detail = el("tr", {"class": "steps"});
    var cell = el("td", {colspan: "6", "data-testid": "run-steps-" + id});
    cell.appendChild(el("span", {"class": "status"}, "Loading steps…"));
    detail.appendChild(cell);
    row.parentNode.insertBefore(detail, row.nextSibling);
    getJSON("/v1/runs/" + encodeURIComponent(id)).then(function (response) {
      clear(cell);
      steps(cell, id, response || {});
    }, function (error) {
      clear(cell);
      cell.appendChild(el("span", {"class": "message", "data-testid": "run-steps-error-" + id},
                          error.message || String(error)));
    });
  }

  function steps(cell, id, response) {
    var list = response.steps || [];
    if (!list.length) {
      cell.appendChild(el("span", {"class": "status", "data-testid": "run-no-steps-" + id}, "This run has no steps."));
    } else {
      var table = el("table", {"class": "steps-table", "data-testid": "steps-table-" + id});
      var head = el("tr");
      ["Step", "Tool", "Status", "Duration", "Cost"].forEach(function (name, i) {
        head.appendChild(el("th", i >= 3 ? {"class": "num"} : null, name));
      });
      var thead = el("thead");
      thead.appendChild(head);
      table.appendChild(thead);
      var tbody = el("tbody");
      list.forEach(function (step) {
        var sid = id + "-" + String(step.step_id);
        var tr = el("tr", {"data-testid": "step-" + sid});
        tr.appendChild(el("td", {"data-testid": "step-id-" + sid}, step.step_id));
        tr.appendChild(el("td", {"class": "mono", "data-testid": "step-tool-" + sid}, step.tool_name));
        var st = el("td");
        st.appendChild(el("span", {"class": "badge " + String(step.status), "data-testid": "step-status-" + sid},
                          step.status));
        tr.appendChild(st);
        tr.appendChild(el("td", {"class": "num", "data-testid": "step-duration-" + sid},
                          Number(step.duration_s || 0).toFixed(3) + " s"));
        tr.appendChild(el("td", {"class": "num", "data-testid": "step-cost-" + sid}, money(step.cost_usd || 0)));
        tbody.appendChild(tr);
      });
      table.appendChild(tbody);
      cell.appendChild(table);
    }
    var total = el("p", {"class": "foot"});
    total.appendChild(document.createTextNode("Run total (steps and planning): "));
    total.appendChild(el("span", {"data-testid": "run-total-" + id}, money(response.total_cost_usd || 0)));
    cell.appendChild(total);
  }

  /* --- start -------------------------------------------------------------------------- */

  function start() {
    if (typeof window.Chart !== "function") {
      showMessage("The chart library (/dashboard/assets/chart.umd.min.js) did not load.");
      return;
    }
    $("key-form").addEventListener("submit", function (event) {
      event.preventDefault();
      var key = $("key-input").value.trim();
      if (!key) { showMessage("Enter an admin API key."); return; }
      storeKey(key);
      load();
    });
    $("refresh").addEventListener("click", load);
    $("period").addEventListener("change", load);
    $("forget").addEventListener("click", function () {
      storeKey(null);
      state.loading++;
      blank();
      showMessage("");
      showStatus("Enter an admin API key to load the dashboard.");
      showForm(true);
    });
    var key = keyFromFragment() || storedKey();
    if (key) {
      storeKey(key);
      load();
    } else {
      showForm(true);
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
}());
