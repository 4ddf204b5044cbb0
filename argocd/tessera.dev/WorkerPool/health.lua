-- Argo CD health of a tessera.dev WorkerPool (Lua 5.1): Healthy when as many workers are ready as the
-- pool wants (a pool scaled to zero is healthy), Progressing while workers start.
local hs = {}
if obj.status ~= nil and obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "Ready" then
      if c.status == "True" then
        hs.status = "Healthy"
      else
        hs.status = "Progressing"
      end
      hs.message = c.reason .. ": " .. (c.message or "")
      return hs
    end
  end
end
hs.status = "Progressing"
hs.message = "Waiting for the Tessera operator"
return hs
