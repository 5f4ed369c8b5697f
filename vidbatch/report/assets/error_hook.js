window.__reportErrors = [];
(function () {
  function render() {
    var box = document.getElementById('js-errors');
    if (box && window.__reportErrors.length) { box.hidden = false; box.textContent = window.__reportErrors.join('\n'); }
  }
  function show(msg) { window.__reportErrors.push(msg); render(); }
  window.addEventListener('error', function (e) {
    if (e.target && e.target !== window && (e.target.tagName === 'VIDEO' || e.target.tagName === 'IMG' || e.target.tagName === 'SOURCE')) {
      show('media failed to load: ' + (e.target.currentSrc || e.target.getAttribute('src')));
    } else { show('script error: ' + e.message + ' (' + (e.filename || '') + ':' + (e.lineno || '') + ')'); }
  }, true);
  window.addEventListener('unhandledrejection', function (e) { show('unhandled rejection: ' + e.reason); });
  var original = console.error;
  console.error = function () { show('console.error: ' + Array.prototype.join.call(arguments, ' ')); original.apply(console, arguments); };
  document.addEventListener('DOMContentLoaded', render);  // errors from before the box existed
})();
