"""The embedded stack (Tansu broker, redis-server, chDB) and the child processes that run on it: servers,
workers, topic administration and analyst queries through a running worker."""
