-- Orthanc → dicom-node: forward every stable CR/DX series to the node, once.
--
-- The node's results come back into the same study as new series (Secondary Capture
-- with the source's Modality, SEG and SR; Manufacturer "dicom-node"), which the
-- Manufacturer test below keeps from being forwarded: no loop.
-- A series is forwarded when it has been stable for Orthanc's "StableAge" seconds;
-- a late image of a series makes it stable again and is forwarded with it (the node
-- answers instances it already holds with success and analyses each image once per
-- arrival).

NODE_MODALITY = 'dicom-node'   -- the "DicomModalities" entry of the node

function OnStableSeries(seriesId, tags, metadata)
  local modality = tags['Modality'] or ''
  local manufacturer = tags['Manufacturer'] or ''
  if (modality ~= 'CR' and modality ~= 'DX') or manufacturer == 'dicom-node' then
    return
  end
  print('Forwarding ' .. modality .. ' series ' .. seriesId .. ' to ' .. NODE_MODALITY)
  RestApiPost('/modalities/' .. NODE_MODALITY .. '/store', seriesId)
end
