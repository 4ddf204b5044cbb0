-- Let the job go on from where it stopped.
obj.spec.suspend = false
return obj
