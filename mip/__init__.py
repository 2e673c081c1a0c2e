"""mip: what the three entry points share (mip_server.py, mipper.py; mip_client.py stands alone).

The folders show the layers. The modules directly here are the core, which knows nothing of
HTTP and never imports luigi; `links/` talks to the outside world (the CDR, notice
receivers, the disk's retention); `web/` is the only part that speaks HTTP.
"""

# one version for mipper, the server and the client (mip_client.py keeps a copy: it stands
# alone; tests/test_papercuts.py checks they agree)
VERSION = "0.1.0"
