// The Strait console's only script (served by the gateway: the Content-Security-Policy allows no other).
// A page whose <main> says data-refresh="N" is fetched again every N seconds while it is visible, and its
// <main> replaced; never while focus is inside it (a link, a field) or the reader has paused the refresh with the button.
"use strict";
(function () {
  var main = document.getElementById("main");
  var status = document.getElementById("refreshed");
  if (!main || !main.dataset.refresh) return;
  var seconds = Math.max(2, parseInt(main.dataset.refresh, 10) || 10);
  var paused = false;
  var button = document.createElement("button");
  button.type = "button";
  button.className = "pause";
  button.setAttribute("aria-pressed", "false");
  button.textContent = "Pause refresh";
  button.addEventListener("click", function () {
    paused = !paused;
    button.setAttribute("aria-pressed", String(paused));
    button.textContent = paused ? "Resume refresh" : "Pause refresh";
  });
  if (status) status.parentNode.insertBefore(button, status);

  // Focus inside <main> (a keyboard user on a link, someone typing): replacing it would lose their place.
  function busy() {
    var active = document.activeElement;
    return active && active !== main && main.contains(active);
  }

  function refresh() {
    if (paused || document.visibilityState !== "visible" || busy()) return;
    fetch(window.location.href, { credentials: "same-origin", headers: { accept: "text/html" } })
      .then(function (r) {
        if (r.redirected || !r.ok) throw new Error("status " + r.status);
        return r.text();
      })
      .then(function (text) {
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("main");
        if (!fresh) return;
        main.innerHTML = fresh.innerHTML;
        if (status) status.textContent = "Updated " + new Date().toLocaleTimeString();
      })
      .catch(function () {
        if (status) status.textContent = "Refresh failed; showing older figures";
      });
  }

  window.setInterval(refresh, seconds * 1000);
})();
