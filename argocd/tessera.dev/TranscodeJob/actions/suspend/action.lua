-- Hold the job: no new work is handed out, running tasks are given back, finished chunks are kept.
obj.spec.suspend = true
return obj
