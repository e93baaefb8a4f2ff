"""The control API: HTTP plumbing (``http``), the socket and TCP listeners
(``listeners``), the routes (``routes``) over the control facade (``control``), with
explicit caption requests, schemas, path and peer security and the OpenAPI document."""
