// captiond web UI: live overview, forms sent in the background, keyboard review.
// Plain JavaScript, no build step; the CSP allows scripts from the daemon only.
"use strict";

(function () {
  const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

  async function post(form) {
    const body = new URLSearchParams(new FormData(form));
    const resp = await fetch(form.action, {
      method: "POST",
      body,
      headers: { Accept: "application/json", "X-CSRF-Token": csrf() },
      credentials: "same-origin",
    });
    let data = {};
    try { data = await resp.json(); } catch (e) { data = { error: resp.statusText }; }
    if (!resp.ok) {
      const err = new Error(data.error || resp.statusText);
      err.status = resp.status;
      err.data = data;
      throw err;
    }
    return data;
  }

  function say(form, text, kind) {
    const el = form.querySelector(".status");
    if (!el) return;
    el.textContent = text;
    el.className = "status small " + (kind || "");
  }

  // -- live overview --------------------------------------------------------------
  function applySections(sections) {
    for (const [name, html] of Object.entries(sections)) {
      const el = document.querySelector('[data-live="' + name + '"]');
      if (el && el.innerHTML !== html) el.innerHTML = html;
    }
  }

  function startLive() {
    const dot = document.getElementById("live-status");
    let polling = null;
    const mark = (text, cls) => { if (dot) { dot.textContent = text; dot.className = "live-dot " + cls; } };
    const poll = async () => {
      try {
        const r = await fetch("/ui/live", { headers: { Accept: "application/json" } });
        if (r.ok) { applySections((await r.json()).sections); mark("live (polling)", "on"); }
        else mark("offline", "off");
      } catch (e) { mark("offline", "off"); }
    };
    const startPolling = () => { if (!polling) { polling = setInterval(poll, 2000); poll(); } };
    if (!window.EventSource) { startPolling(); return; }
    const es = new EventSource("/ui/events");
    let opened = false;
    es.onopen = () => { opened = true; mark("live", "on"); };
    es.onmessage = (ev) => { applySections(JSON.parse(ev.data).sections); mark("live", "on"); };
    es.onerror = () => {
      if (!opened || es.readyState === EventSource.CLOSED) { es.close(); startPolling(); }
      else mark("reconnecting", "off");
    };
    window.captiondLive = { poll };
  }

  // -- forms sent in the background -------------------------------------------------
  function reloadSoon(ms) { setTimeout(() => window.location.reload(), ms); }

  async function followRequest(form, id) {
    for (let i = 0; i < 600; i++) {
      await new Promise((r) => setTimeout(r, 1000));
      const r = await fetch("/ui/request/" + encodeURIComponent(id), { headers: { Accept: "application/json" } });
      if (!r.ok) break;
      const s = await r.json();
      if (s.finished || ["done", "failed", "cancelled"].includes(s.state)) {
        say(form, s.state === "done" ? "Done." : "Finished: " + s.state, s.state === "done" ? "ok" : "bad");
        reloadSoon(400);
        return;
      }
      say(form, "Queued: " + (s.state || "waiting") + "…");
    }
  }

  function onSubmit(ev) {
    const form = ev.target.closest("form[data-ajax]");
    if (!form) return;
    ev.preventDefault();
    if (form.hasAttribute("data-regenerate")) {
      const warn = form.querySelector(".person-warning");
      const box = form.querySelector('input[name="replace_person"]');
      if (warn && !warn.hidden && box && !box.checked) {
        say(form, "Tick “replace the person's caption” first.", "bad");
        box.focus();
        return;
      }
    }
    const button = form.querySelector("button");
    if (button) button.disabled = true;
    say(form, form.hasAttribute("data-regenerate") ? "Captioning…" : "Saving…");
    post(form).then((data) => {
      if (form.hasAttribute("data-editor")) {
        const ta = form.querySelector("textarea");
        if (ta) ta.dataset.saved = ta.value;
        form.classList.remove("dirty");
        say(form, "Saved.", "ok");
        const pill = form.querySelector(".editor-head .pill");
        if (pill) { pill.textContent = "a person's (saved here)"; pill.className = "pill person"; }
      } else if (form.hasAttribute("data-regenerate")) {
        if (data.queued) { say(form, data.message || "Queued…"); followRequest(form, data.request_id); }
        else if (data.success) { say(form, "Done.", "ok"); reloadSoon(300); }
        else { say(form, (data.error_type || "failed") + ": " + (data.error || ""), "bad"); }
      } else {
        say(form, "Done.", "ok");
        if (window.captiondLive) window.captiondLive.poll(); else reloadSoon(300);
      }
    }).catch((err) => {
      say(form, err.message, "bad");
      if (form.closest("[data-live]")) alert(err.message);
    }).finally(() => { if (button) button.disabled = false; });
  }

  // -- keyboard ---------------------------------------------------------------------
  function typing(el) {
    return el && (el.tagName === "TEXTAREA" || el.tagName === "INPUT" || el.tagName === "SELECT" || el.isContentEditable);
  }

  function onKey(ev) {
    const el = document.activeElement;
    const page = document.body.classList;
    if (page.contains("image-page")) {
      if (el && el.tagName === "TEXTAREA") {
        if ((ev.ctrlKey || ev.metaKey) && (ev.key === "Enter" || ev.key === "s")) {
          ev.preventDefault();
          el.form.requestSubmit();
        } else if (ev.key === "Escape") {
          el.blur();
        }
        return;
      }
      if (typing(el) || ev.ctrlKey || ev.metaKey || ev.altKey) return;
      const click = (id) => { const a = document.getElementById(id); if (a) { ev.preventDefault(); a.click(); } };
      switch (ev.key) {
        case "ArrowLeft": case "k": click("prev"); break;
        case "ArrowRight": case "j": click("next"); break;
        case "e": {
          const ta = document.querySelector("form[data-editor] textarea:not([readonly])");
          if (ta) { ev.preventDefault(); ta.focus(); ta.setSelectionRange(ta.value.length, ta.value.length); }
          break;
        }
        case "r": {
          const f = document.querySelector("form[data-regenerate]");
          if (f) { ev.preventDefault(); f.requestSubmit(); }
          break;
        }
        case "g": {
          const a = document.querySelector(".crumbs a");
          if (a) { ev.preventDefault(); a.click(); }
          break;
        }
      }
    } else if (page.contains("gallery-page") && !typing(el) && !ev.ctrlKey && !ev.metaKey) {
      const tiles = Array.from(document.querySelectorAll(".tile-link"));
      if (!tiles.length) return;
      const i = tiles.indexOf(el);
      if (ev.key === "ArrowRight" || ev.key === "j") { ev.preventDefault(); tiles[Math.min(i + 1, tiles.length - 1)].focus(); }
      else if (ev.key === "ArrowLeft" || ev.key === "k") { ev.preventDefault(); tiles[Math.max(i - 1, 0)].focus(); }
    }
  }

  function onChange(ev) {
    const sel = ev.target.closest("form[data-regenerate] select");
    if (sel) {
      const form = sel.form;
      const who = sel.selectedOptions[0].dataset.person;
      const warn = form.querySelector(".person-warning");
      warn.hidden = !who;
      warn.querySelector(".which").textContent = who;
    }
  }

  function onInput(ev) {
    const ta = ev.target.closest("form[data-editor] textarea");
    if (ta) ta.form.classList.toggle("dirty", ta.value !== (ta.dataset.saved ?? ta.defaultValue));
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (document.querySelector("[data-live-page]")) startLive();
    document.addEventListener("submit", onSubmit);
    document.addEventListener("keydown", onKey);
    document.addEventListener("change", onChange);
    document.addEventListener("input", onInput);
    for (const a of document.querySelectorAll("a[data-back]")) {
      a.addEventListener("click", (ev) => { if (history.length > 1) { ev.preventDefault(); history.back(); } });
    }
    window.addEventListener("beforeunload", (ev) => {
      if (document.querySelector("form.dirty")) { ev.preventDefault(); ev.returnValue = ""; }
    });
  });
})();
