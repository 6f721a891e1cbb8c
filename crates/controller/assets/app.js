// jitgate dashboard: progressive enhancement only. Every page works without this
// script; it adds countdowns, live refresh, selection counts and port rows.
// It never builds HTML from strings: text goes in with textContent, and a refresh
// takes whole elements from the controller's own (escaped) page.
"use strict";

function left(ms) {
  if (ms <= 0) return "ended";
  var s = Math.floor(ms / 1000), h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  s = s % 60;
  return (h > 0 ? h + " h " : "") + (h > 0 || m > 0 ? m + " min " : "") + s + " s left";
}

function tick() {
  document.querySelectorAll("time[data-end]").forEach(function (t) {
    var end = Date.parse(t.getAttribute("data-end"));
    if (!isNaN(end)) t.textContent = left(end - Date.now());
  });
}

function selection(form) {
  var boxes = form.querySelectorAll('input[type=checkbox][name=vm]');
  var n = 0;
  boxes.forEach(function (b) { if (b.checked) n++; });
  form.querySelectorAll("[data-needs-selection]").forEach(function (b) {
    b.disabled = n === 0;
    var label = b.getAttribute("data-label");
    if (label) b.textContent = label.replace("{n}", String(n)).replace(" 1 VMs", " 1 VM");
  });
}

function wireSelection(root) {
  root.querySelectorAll("form[data-select]").forEach(function (form) {
    form.addEventListener("change", function (e) {
      if (e.target.hasAttribute("data-select-all")) {
        form.querySelectorAll('input[type=checkbox][name=vm]').forEach(function (b) { b.checked = e.target.checked; });
      }
      selection(form);
    });
    selection(form);
  });
}

function wireRows(root) {
  var add = root.querySelector("[data-add-row]");
  var tmpl = root.querySelector("tr[data-template]");
  if (add && tmpl) {
    add.addEventListener("click", function () {
      var row = tmpl.cloneNode(true);
      row.removeAttribute("data-template");
      row.querySelectorAll("input[name=port]").forEach(function (i) { i.value = ""; });
      tmpl.parentNode.insertBefore(row, tmpl);
      var first = row.querySelector("input");
      if (first) first.focus();
    });
  }
  root.addEventListener("click", function (e) {
    if (e.target.hasAttribute && e.target.hasAttribute("data-remove-row")) {
      var row = e.target.closest("tr");
      var rows = row.parentNode.querySelectorAll("tr.port-row");
      if (rows.length > 1) row.remove();
      else row.querySelectorAll("input[name=port]").forEach(function (i) { i.value = ""; });
    }
  });
}

function wireSliders(root) {
  root.querySelectorAll("input[data-minutes]").forEach(function (r) {
    var out = r.parentNode.querySelector("output");
    var show = function () {
      var m = Number(r.value), h = Math.floor(m / 60);
      if (out) out.textContent = (h > 0 ? h + " h " : "") + (m % 60 > 0 || h === 0 ? (m % 60) + " min" : "");
    };
    r.addEventListener("input", show);
    show();
  });
}

// Live: poll a cheap endpoint; when anything changed, fetch this page again and
// swap the regions marked data-live-region (unless the person is typing there).
function live() {
  var url = document.body.getAttribute("data-live");
  if (!url) return;
  var seen = null;
  var busy = false;
  var last = 0;
  var stopped = false;
  function poll() {
    // At most one refresh every 5 s, whatever happens in the log meanwhile.
    if (stopped || busy || document.hidden || Date.now() - last < 5000) return;
    busy = true;
    fetch(url, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (j) {
        if (!j) return null;
        if (seen === null) { seen = j.v; return null; }
        if (j.v === seen) return null;
        seen = j.v;
        last = Date.now();
        return fetch(location.href, { credentials: "same-origin", cache: "no-store" })
          .then(function (r) {
            // A page that can no longer be shown is not asked for again.
            if (!r.ok) { stopped = true; return null; }
            return r.text();
          })
          .then(function (html) {
            if (!html) return;
            var doc = new DOMParser().parseFromString(html, "text/html");
            document.querySelectorAll("[data-live-region]").forEach(function (old) {
              if (old.contains(document.activeElement) && document.activeElement !== document.body) return;
              var fresh = doc.getElementById(old.id);
              if (fresh) {
                old.replaceWith(document.importNode(fresh, true));
              }
            });
            wireSelection(document);
            tick();
          });
      })
      .catch(function () {})
      .then(function () { busy = false; });
  }
  poll();
  setInterval(poll, 1000);
}

document.addEventListener("DOMContentLoaded", function () {
  wireSelection(document);
  wireRows(document);
  wireSliders(document);
  tick();
  setInterval(tick, 1000);
  live();
});
