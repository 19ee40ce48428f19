"""slimta: a reusable, asynchronous mail-transfer-agent library built on gevent."""
