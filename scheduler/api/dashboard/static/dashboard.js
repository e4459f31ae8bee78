// Progress bars that move without a reload, confirm dialogs and the copy button. No dependencies.
(function () {
  "use strict";
  var POLL_MS = 1000;

  function pct(n, total) { return total ? (100 * n / total) + "%" : "0%"; }

  function update(box, p) {
    var total = p.total, c = p.counts;
    var segs = { ok: c.succeeded, failed: c.failed, cancelled: c.cancelled, running: c.running };
    Object.keys(segs).forEach(function (k) {
      var el = box.querySelector(".seg." + k);
      if (el) { el.style.width = pct(segs[k] || 0, total); }
    });
    box.querySelector(".bar").setAttribute("aria-valuenow", String(p.done));
    box.querySelector(".bar-text").textContent = p.done + " / " + total;
    if (p.final) { box.dataset.final = "1"; }
  }

  function updateCounts(el, c) {
    var map = { "c-ok": [c.succeeded, "ok"], "c-reused": [c.reused, "reused"], "c-failed": [c.failed, "failed"],
                "c-running": [c.running, "running"], "c-pending": [c.pending, "pending"],
                "c-cancelled": [c.cancelled, "cancelled"] };
    Object.keys(map).forEach(function (cls) {
      var s = el.querySelector("." + cls);
      if (s) { s.textContent = (map[cls][0] || 0) + " " + map[cls][1]; }
    });
    var reused = el.querySelector(".c-reused");
    if (reused) { reused.hidden = !c.reused; }
  }

  function poll() {
    var open = Array.prototype.slice.call(document.querySelectorAll(".progress[data-final='0']"));
    if (!open.length) { return; }
    var ids = open.map(function (el) { return el.dataset.job; });
    var q = ids.map(function (id) { return "id=" + encodeURIComponent(id); }).join("&");
    fetch("/ui/progress?" + q, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) {
        if (!data) { return; }
        open.forEach(function (box) {
          var p = data[box.dataset.job];
          if (!p) { return; }
          update(box, p);
          document.querySelectorAll("[data-counts='" + box.dataset.job + "']").forEach(function (el) { updateCounts(el, p.counts); });
          document.querySelectorAll("[data-status='" + box.dataset.job + "']").forEach(function (el) {
            el.textContent = p.status; el.className = "status st-" + p.status;
          });
          if (box.dataset.done !== String(p.done)) {
            box.dataset.done = String(p.done);
            refreshGallery();
          }
          if (p.final) {
            var note = document.querySelector(".finished-note");
            if (note) { note.hidden = false; }
            var cancel = document.getElementById("cancel");
            if (cancel) { cancel.disabled = true; }
          }
        });
      })
      .catch(function () { /* the next tick tries again */ })
      .then(function () { setTimeout(poll, POLL_MS); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    setTimeout(poll, POLL_MS);
    document.querySelectorAll("form[data-confirm]").forEach(function (f) {
      f.addEventListener("submit", function (e) { if (!window.confirm(f.dataset.confirm)) { e.preventDefault(); } });
    });
    document.querySelectorAll("button[data-copy]").forEach(function (b) {
      b.addEventListener("click", function () {
        var text = document.getElementById(b.dataset.copy).textContent;
        var done = function () { b.textContent = "Copied"; setTimeout(function () { b.textContent = "Copy"; }, 1500); };
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(text).then(done, function () { fallback(text); done(); });
        } else { fallback(text); done(); }
      });
    });
    document.querySelectorAll("audio").forEach(function (a) {
      a.addEventListener("loadedmetadata", function () {
        var d = a.parentNode.querySelector(".dur");
        if (d && !d.textContent.trim() && isFinite(a.duration)) { d.textContent = a.duration.toFixed(2) + " s"; }
      });
    });
  });

  // On a job page, cards whose item finished since the page was drawn are swapped for their new version
  // (the same page fetched again; only changed cards are replaced, so playing audio is left alone).
  var refreshing = false;
  function refreshGallery() {
    var gallery = document.querySelector(".gallery[data-live]");
    if (!gallery || refreshing) { return; }
    refreshing = true;
    fetch(window.location.href, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (!html) { return; }
        var fresh = new DOMParser().parseFromString(html, "text/html").querySelector(".gallery");
        if (!fresh) { return; }
        fresh.querySelectorAll(".card[data-index]").forEach(function (card) {
          var old = gallery.querySelector(".card[data-index='" + card.dataset.index + "']");
          if (old && old.outerHTML !== card.outerHTML) { old.replaceWith(document.importNode(card, true)); }
        });
      })
      .catch(function () { /* the next change tries again */ })
      .then(function () { refreshing = false; });
  }

  function fallback(text) {
    var t = document.createElement("textarea");
    t.value = text; document.body.appendChild(t); t.select();
    try { document.execCommand("copy"); } catch (e) { /* nothing more to try */ }
    document.body.removeChild(t);
  }
})();
