-- Argo CD resource actions of a TranscodeJob: suspend while it runs or waits, resume while suspended.
local actions = {}
local finished = false
if obj.status ~= nil and (obj.status.phase == "Succeeded" or obj.status.phase == "Failed") then
  finished = true
end
local suspended = obj.spec ~= nil and obj.spec.suspend == true
actions["suspend"] = {["disabled"] = finished or suspended}
actions["resume"] = {["disabled"] = finished or not suspended}
return actions
