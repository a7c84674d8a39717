"""``ctxflow report``: the analyst views (one SQL each), collected through the analyst query path and shown as
terminal tables or one offline HTML file; the Grafana dashboards run the same SQL."""
