"""What every tokentrace process shares at run time, whichever package it belongs to:
the data directory's layout (``layout``), bearer-token auth (``auth``) and TLS
(``tls``). Imports only the standard library and what those need; never the collector,
the serving stack or the instrumentation."""
