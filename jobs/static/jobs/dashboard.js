// The operator's dashboard reads its sections again every few seconds (not while the tab is hidden
// or paused) and swaps them in place: no reload, the scroll position stays. No build step.
(function () {
  "use strict";
  var state = document.getElementById("refresh-state");
  var toggle = document.getElementById("refresh-toggle");
  var board = document.getElementById("dashboard");
  if (!state || !board) { return; }
  var seconds = parseInt(state.getAttribute("data-seconds"), 10) || 10;
  var url = state.getAttribute("data-url");
  var paused = false;
  var busy = false;

  function stamp(text) { state.textContent = text; }

  function read() {
    if (paused || busy || document.hidden) { return; }
    busy = true;
    fetch(url, { credentials: "same-origin", headers: { "X-Requested-With": "XMLHttpRequest" } })
      .then(function (response) {
        if (response.redirected || !response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) {
        board.innerHTML = html;
        stamp("Read at " + new Date().toLocaleTimeString() + "; reads itself again every " + seconds + " s.");
        board.setAttribute("data-reads", String((parseInt(board.getAttribute("data-reads"), 10) || 0) + 1));
      })
      .catch(function (error) { stamp("Could not read the dashboard again (" + error.message + "); retrying."); })
      .then(function () { busy = false; });
  }

  toggle.addEventListener("click", function () {
    paused = !paused;
    toggle.textContent = paused ? "Resume" : "Pause";
    if (!paused) { read(); }
  });
  board.addEventListener("submit", function (event) {
    var question = event.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) { event.preventDefault(); }
  });
  window.setInterval(read, seconds * 1000);
})();
