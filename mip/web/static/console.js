// console.js: the mip console's only script (CSP: no inline script anywhere).
// Polls the JSON answers a page names in <main data-watch>; when one changes, fetches the
// page again and swaps in its [data-live] regions (the server renders and escapes them).
// Follows a log (the run's, a module's) with GET ...?offset=N (X-Log-Offset), posts cancel
// and rerun after a confirmation, and shows every time in the browser's own zone. Text from
// the server only ever reaches the page through textContent.
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
        el.textContent = shown.day + " " + shown.clock;
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

  watch();
  if (logBox) {
    followLog();
  }
})();
