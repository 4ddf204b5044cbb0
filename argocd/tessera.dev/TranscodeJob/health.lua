-- Argo CD health of a tessera.dev TranscodeJob (Lua 5.1, as Argo CD's gopher-lua runs it).
-- Healthy once Ready is True; Degraded when it failed or stalled (the condition's reason and message);
-- Suspended while spec.suspend holds it; Progressing otherwise.
local hs = {}
local conditions = {}
if obj.status ~= nil and obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    conditions[c.type] = c
  end
end
local function said(c)
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason
end
local ready = conditions["Ready"]
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = said(ready)
  return hs
end
for _, t in ipairs({"Failed", "Stalled"}) do
  local c = conditions[t]
  if c ~= nil and c.status == "True" then
    hs.status = "Degraded"
    hs.message = said(c)
    return hs
  end
end
if obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  if ready ~= nil and ready.reason == "Suspended" then
    hs.message = said(ready)
  else
    hs.message = "spec.suspend is true"
  end
  return hs
end
hs.status = "Progressing"
if ready ~= nil then
  hs.message = said(ready)
else
  hs.message = "Waiting for the Tessera operator"
end
return hs
