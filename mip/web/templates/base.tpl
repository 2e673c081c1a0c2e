<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}} · mip</title>
<link rel="icon" href="/ui/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/ui/console.css">
<script src="/ui/console.js" defer></script>
</head>
<body>
<header>
<a class="brand" href="/ui">mip</a>
<nav>
<a href="/ui/runs">Runs</a>
<a href="/ui/new">New run</a>
<a href="/ui/jobs">Jobs</a>
<a href="/ui/maps">Maps</a>
<a href="/ui/modules">Modules</a>
<a href="/docs">API</a>
</nav>
</header>
<main id="page" data-watch="{{watch}}" data-poll-ms="{{poll_ms}}">
<h1>{{title}}</h1>
<p id="notice" class="notice" role="status" hidden></p>
{{!base}}
</main>
</body>
</html>
