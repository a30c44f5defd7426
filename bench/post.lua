wrk.method = "POST"
wrk.body = '{"report": "q3", "regions": [1, 2, 3, 4]}'
wrk.headers["Content-Type"] = "application/json"
