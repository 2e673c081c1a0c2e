// console.js: the mip console's only script (CSP: no inline script anywhere).
// Polls the JSON answers a page names in <main data-watch>; when one changes, fetches the
// page again and swaps in its [data-live] regions (the server renders and escapes them).
// Follows a log (the run's, a module's) with GET ...?offset=N (X-Log-Offset), posts cancel
// and rerun after a confirmation, submits the New run form to POST /runs (with an
// Idempotency-Key, an error shown next to the field it names), and shows every time in the
// browser's own zone. Text from the server only ever reaches the page through textContent.
"use strict";

(function () {
  const main = document.getElementById("page");
  if (!main) {
    return;
  }

  // the server writes each time in UTC (<time datetime="...Z" title="... UTC">, and in the
  // graph <text data-time>); shown here in the browser's zone, named: 2026-12-04 14:31:05 MST
  const zoneFormat = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
    second: "2-digit", hourCycle: "h23", timeZoneName: "short", numberingSystem: "latn"});
  function local(iso) {
    const when = new Date(iso);
    if (isNaN(when)) {
      return null;
    }
    const part = {};
    for (const p of zoneFormat.formatToParts(when)) {
      part[p.type] = p.value;
    }
    return {day: part.year + "-" + part.month + "-" + part.day,
            clock: part.hour + ":" + part.minute + ":" + part.second + " " + part.timeZoneName};
  }
  function showTimes(root) {
    for (const el of root.querySelectorAll("time[datetime]")) {
      const shown = local(el.getAttribute("datetime"));
      if (shown) {
        // the day and the clock each whole: a narrow column breaks between them only
        const day = document.createElement("span");
        const clock = document.createElement("span");
        day.className = "day";
        clock.className = "clock";
        day.textContent = shown.day;
        clock.textContent = shown.clock;
        el.replaceChildren(day, " ", clock);
      }
    }
    for (const el of root.querySelectorAll("svg text[data-time]")) {
      const shown = local(el.dataset.time);
      if (shown) {
        const utc = el.dataset.time.replace("T", " ").replace("Z", " UTC");
        el.textContent = shown.clock;
        const tip = document.createElementNS("http://www.w3.org/2000/svg", "title");
        tip.textContent = utc;
        el.prepend(tip);
      }
    }
  }
  showTimes(document);
  const pollMs = Number(main.dataset.pollMs) || 1500;
  const notice = document.getElementById("notice");

  function say(text) {
    notice.textContent = text;
    notice.hidden = !text;
  }

  async function getText(url) {
    const resp = await fetch(url, {credentials: "same-origin", cache: "no-store",
                                   headers: {Accept: "application/json"}});
    if (!resp.ok) {
      throw new Error(url + ": " + resp.status);
    }
    return resp.text();
  }

  async function refresh() {
    const resp = await fetch(location.href, {credentials: "same-origin", cache: "no-store",
                                             headers: {Accept: "text/html"}});
    if (!resp.ok) {
      return false;
    }
    const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
    for (const region of document.querySelectorAll("[data-live]")) {
      const fresh = region.id && doc.getElementById(region.id);
      if (fresh) {
        const node = document.importNode(fresh, true);
        showTimes(node);
        region.replaceWith(node);
      }
    }
    const freshMain = doc.getElementById("page");
    if (freshMain) {
      main.dataset.watch = freshMain.dataset.watch || "";
    }
    return true;
  }

  let seen = null;
  let seenWatch = null;
  let refreshed = Date.now();
  async function watch() {
    const watched = main.dataset.watch || "";
    const urls = watched.split(" ").filter(Boolean);
    if (urls.length) {
      try {
        const now = (await Promise.all(urls.map(getText))).join("\n");
        // a first look (or at other answers) is no baseline: what changed between the
        // page's rendering and this look would be missed, so the page is fetched again;
        // while something runs, its duration is brought up to date every 10 s
        const ticking = document.querySelector(".st-running") && Date.now() - refreshed > 10000;
        if ((watched !== seenWatch || now !== seen || ticking) && await refresh()) {
          seen = now;
          seenWatch = watched;
          refreshed = Date.now();
        }
      } catch (e) {
        // the server is restarting or away: the next poll tries again
      }
    }
    setTimeout(watch, pollMs);
  }

  const logBox = document.getElementById("log");
  const decoder = new TextDecoder("utf-8");
  let offset = 0;
  async function followLog() {
    const summary = document.getElementById("summary");
    const finished = summary && summary.dataset.finished === "yes";
    let grew = false;
    try {
      const resp = await fetch(logBox.dataset.log + "?offset=" + offset,
                               {credentials: "same-origin", cache: "no-store"});
      if (resp.ok) {
        const next = resp.headers.get("X-Log-Offset");
        const bytes = await resp.arrayBuffer();
        const atBottom = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 20;
        if (next === null) {
          // a server without log offsets sends the whole log every time
          logBox.textContent = new TextDecoder("utf-8").decode(bytes);
          grew = true;
        } else if (Number(next) < offset) {
          // the log was deleted and began again: start over
          logBox.textContent = "";
          offset = 0;
          grew = true;
        } else {
          if (bytes.byteLength) {
            logBox.append(decoder.decode(bytes, {stream: true}));
            grew = true;
          }
          offset = Number(next);
        }
        if (grew && atBottom) {
          logBox.scrollTop = logBox.scrollHeight;
        }
      }
    } catch (e) {
      // try again at the next poll
    }
    if (!finished || grew) {
      setTimeout(followLog, pollMs);
    }
  }

  // an error page's way back, shown only where there is a page to go back to
  const back = document.querySelector("button[data-back]");
  if (back && history.length > 1) {
    back.hidden = false;
    back.addEventListener("click", function () { history.back(); });
  }

  document.addEventListener("click", async function (event) {
    const button = event.target.closest("button[data-post]");
    if (!button || !window.confirm(button.dataset.confirm)) {
      return;
    }
    button.disabled = true;
    try {
      const resp = await fetch(button.dataset.post, {method: "POST", credentials: "same-origin",
                                                     headers: {Accept: "application/json"}});
      const body = await resp.json().catch(function () { return {}; });
      if (!resp.ok) {
        say(button.textContent + " refused: " + (body.message || resp.status));
        return;
      }
      if (button.dataset.then === "open" && body.run_id) {
        location.assign("/ui/runs/" + encodeURIComponent(body.run_id));
        return;
      }
      say(button.textContent + ": done");
      await refresh();
    } catch (e) {
      say(button.textContent + " failed: " + e);
    } finally {
      button.disabled = false;
    }
  });

  // ------------------------------------------------------------------ the New run form

  const form = document.getElementById("new-run");
  // a field named by an error that has no box of its own
  const FIELD_OF_CODE = {unknown_map: "map", unreadable_map: "map", job_busy: "job",
                         job_bound_to_other_map: "job", gpu_required: "modules"};

  function newKey() {
    // crypto.randomUUID() exists only on https or localhost; getRandomValues everywhere
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, function (b) { return b.toString(16).padStart(2, "0"); }).join("");
  }

  function errorBox(path) {
    // `extra_switches.map_crop[0]` is shown at extra_switches.map_crop, else extra_switches
    let name = path.replace(/(\[\d+\])+$/, "");
    for (;;) {
      const box = form.querySelector('[data-error-for="' + CSS.escape(name) + '"]');
      if (box || !name) {
        return box;
      }
      name = name.includes(".") ? name.slice(0, name.lastIndexOf(".")) : "";
    }
  }

  function clearErrors() {
    for (const box of form.querySelectorAll("[data-error-for]")) {
      box.textContent = "";
      box.hidden = true;
    }
    for (const field of form.querySelectorAll("[aria-invalid]")) {
      field.removeAttribute("aria-invalid");
    }
  }

  function showError(path, text) {
    const box = errorBox(path) || errorBox("");
    box.textContent = text;
    box.hidden = false;
    const field = box.parentElement.querySelector("input, select, textarea");
    if (field && path) {
      field.setAttribute("aria-invalid", "true");
    }
    box.scrollIntoView({block: "center"});
  }

  function serverError(status, body) {
    const message = String(body.message || ("the server answered " + status));
    // a 4xx message opens with the field it names: `modules[0]: ...`, `notify_url: ...`
    const head = /^([A-Za-z_][\w.-]*(?:\[\d+\])*): /.exec(message);
    const path = head ? head[1] : (FIELD_OF_CODE[body.error] || "");
    showError(path, message);
  }

  function lines(text) {
    return text.split("\n").map(function (l) { return l.trim(); }).filter(Boolean);
  }

  function payloadOf() {
    const body = {job: form.querySelector("#job").value.trim(),
                  map: form.querySelector("#map").value, modules: []};
    if (form.querySelector("[data-modules-all]").checked) {
      body.modules = [form.querySelector("[data-modules-all]").value];
    } else {
      for (const box of form.querySelectorAll("[data-module-box]:checked")) {
        body.modules.push(box.value);
      }
    }
    body.force_rerun = form.querySelector("#force_rerun").checked;
    const switches = {};
    for (const area of form.querySelectorAll("textarea[data-switches]")) {
      const args = lines(area.value);
      if (args.length) {
        switches[area.dataset.switches] = args;
      }
    }
    if (Object.keys(switches).length) {
      body.extra_switches = switches;
    }
    const notify = form.querySelector("#notify_url").value.trim();
    if (notify) {
      body.notify_url = notify;
    }
    const key = form.querySelector("#openai_key").value;
    if (key) {
      body.openai_key = key;
    }
    return body;
  }

  function hiddenParts(body) {
    // a value filled from a run's payload as shown, its secret part cut out
    for (const [module, args] of Object.entries(body.extra_switches || {})) {
      if (args.some(function (a) { return a.includes("(hidden)"); })) {
        return "extra_switches." + module;
      }
    }
    return body.notify_url && body.notify_url.includes("(hidden)") ? "notify_url" : null;
  }

  if (form) {
    // one key per filling of the form: a double click (or a retry after a lost answer)
    // makes one run; an edited form is a new submission with a new key
    let idempotencyKey = null;
    let sending = false;
    const forget = function () { idempotencyKey = null; };
    form.addEventListener("input", forget);
    form.addEventListener("change", function (event) {
      forget();
      const box = event.target;
      if (box.matches("[data-modules-all]") && box.checked) {
        for (const one of form.querySelectorAll("[data-module-box]")) {
          one.checked = false;
        }
      } else if (box.matches("[data-module-box]") && box.checked) {
        form.querySelector("[data-modules-all]").checked = false;
      }
    });
    form.addEventListener("submit", async function (event) {
      event.preventDefault();
      if (sending) {
        return;
      }
      clearErrors();
      const body = payloadOf();
      const hidden = hiddenParts(body);
      if (hidden) {
        showError(hidden, "holds a hidden part (\"(hidden)\"): give the whole value again");
        return;
      }
      idempotencyKey = idempotencyKey || newKey();
      const button = form.querySelector("button[type=submit]");
      sending = true;
      button.disabled = true;
      try {
        const resp = await fetch(form.dataset.submit, {
          method: "POST", credentials: "same-origin", body: JSON.stringify(body),
          headers: {"Accept": "application/json", "Content-Type": "application/json",
                    "Idempotency-Key": idempotencyKey}});
        const answer = await resp.json().catch(function () { return {}; });
        if (resp.ok && answer.run_id) {
          location.assign("/ui/runs/" + encodeURIComponent(answer.run_id));
          return;
        }
        serverError(resp.status, answer);
      } catch (e) {
        showError("", "not sent: " + e);
      } finally {
        sending = false;
        button.disabled = false;
      }
    });
  }

  watch();
  if (logBox) {
    followLog();
  }
})();
