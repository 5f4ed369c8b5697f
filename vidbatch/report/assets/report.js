(function () {
  var table = document.getElementById('sample-table');
  var tbody = table.tBodies[0];
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var count = document.getElementById('row-count');
  var filter = document.getElementById('filter');
  var onlyFailed = document.getElementById('only-failed');

  function value(row, col) { var cell = row.cells[col]; return cell ? cell.getAttribute('data-v') : null; }

  function sortBy(name, dir) {
    var col = -1, type = 'text';
    headers.forEach(function (th, i) {
      if (th.getAttribute('data-col') === name) { col = i; type = th.getAttribute('data-type'); th.setAttribute('aria-sort', dir === 'asc' ? 'ascending' : 'descending'); }
      else if (th.hasAttribute('data-col')) { th.setAttribute('aria-sort', 'none'); }
    });
    if (col < 0) { return false; }
    var rows = Array.prototype.slice.call(tbody.rows);
    var sign = dir === 'asc' ? 1 : -1;
    rows.sort(function (a, b) {
      var x = value(a, col), y = value(b, col);
      var ex = x === null || x === '', ey = y === null || y === '';
      var c;
      if (ex || ey) { c = ex && ey ? 0 : (ex ? 1 : -1); }  // empty values last, either direction
      else { c = sign * (type === 'num' ? parseFloat(x) - parseFloat(y) : x.localeCompare(y)); }
      return c !== 0 ? c : (+a.getAttribute('data-i')) - (+b.getAttribute('data-i'));
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
    table.setAttribute('data-sorted', name + ':' + dir);
    return true;
  }

  headers.forEach(function (th) {
    var button = th.querySelector('button');
    if (!button) { return; }
    button.addEventListener('click', function () {
      var name = th.getAttribute('data-col');
      var dir = th.getAttribute('aria-sort') === 'ascending' ? 'desc' : 'asc';
      sortBy(name, dir);
      if (history.replaceState) { history.replaceState(null, '', '#sort=' + name + ':' + dir); }
    });
  });

  function applyFilter() {
    var q = filter.value.trim().toLowerCase(), shown = 0;
    Array.prototype.forEach.call(tbody.rows, function (r) {
      var ok = (!onlyFailed.checked || r.classList.contains('failed')) && (!q || r.textContent.toLowerCase().indexOf(q) >= 0);
      r.hidden = !ok; if (ok) { shown += 1; }
    });
    count.textContent = 'showing ' + shown + ' of ' + tbody.rows.length + ' row(s)';
  }
  filter.addEventListener('input', applyFilter);
  onlyFailed.addEventListener('change', applyFilter);

  // Source and edit of a row play together: starting, pausing or seeking one moves the other.
  Array.prototype.forEach.call(document.querySelectorAll('.pair'), function (pair) {
    var videos = Array.prototype.slice.call(pair.querySelectorAll('video'));
    if (videos.length < 2) { return; }
    var busy = false;
    function follow(source, action) {
      if (busy) { return; } busy = true;
      videos.forEach(function (v) { if (v !== source) { action(v); } }); busy = false;
    }
    videos.forEach(function (v) {
      v.addEventListener('play', function () { follow(v, function (o) { o.currentTime = v.currentTime; var p = o.play(); if (p && p.catch) { p.catch(function () {}); } }); });
      v.addEventListener('pause', function () { follow(v, function (o) { o.pause(); }); });
      v.addEventListener('seeked', function () { follow(v, function (o) { if (Math.abs(o.currentTime - v.currentTime) > 0.05) { o.currentTime = v.currentTime; } }); });
    });
  });
  var playAll = document.getElementById('play-all');
  if (playAll) {
    playAll.addEventListener('click', function () {
      Array.prototype.forEach.call(document.querySelectorAll('#sample-table tbody tr:not([hidden]) video'), function (v) {
        var p = v.play(); if (p && p.catch) { p.catch(function () {}); }
      });
    });
  }

  var m = /sort=([\w-]+):(asc|desc)/.exec(location.hash);
  if (m) { sortBy(m[1], m[2]); }
  applyFilter();
  document.body.setAttribute('data-ready', '1');
})();
