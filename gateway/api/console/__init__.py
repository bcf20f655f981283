"""The console: server-rendered pages at /ui and their JSON at /admin/api, for admin keys (docs/console.md)."""
