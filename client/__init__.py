"""Worker-side loader, installed as ``weightcache.client``.

Header parsing, memory-mapping and device copies. It never imports the daemon's
server side; it imports the embedded pull machinery only when no daemon answers.
"""
