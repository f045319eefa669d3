// Manages broadcast channels and broadcasts through @parse/node-apn's `manageChannels` and `broadcast`,
// configured exactly as for Apple except for the addresses, ports and CA, and prints what the library
// reports: one JSON line per step.
//
// Input: the environment variable COURIER_COMPAT, a JSON object
//   {address: "host", port, channelsPort, ca: "<path>", key: "<.p8 path>", keyId, teamId, bundleId,
//    steps: [{name, action: "create"|"read"|"readAll"|"delete"|"broadcast", channelId?, policy?,
//             expiry?, requestId?, payload?}]}
// Output: {"name", "sent", "result"} per step, in order: `result` is what the library resolved with (sent)
// or its failure ({status, reason}).
'use strict';

const fs = require('fs');
const apn = require('@parse/node-apn');

async function main() {
  const config = JSON.parse(process.env.COURIER_COMPAT);
  const provider = new apn.Provider({
    token: { key: fs.readFileSync(config.key), keyId: config.keyId, teamId: config.teamId },
    address: config.address,
    port: config.port,
    manageChannelsAddress: config.address,
    manageChannelsPort: config.channelsPort,
    ca: fs.readFileSync(config.ca),
    production: false,
    requestTimeout: 10000,
  });
  try {
    for (const step of config.steps) {
      const note = new apn.Notification();
      if (step.requestId) {
        note.requestId = step.requestId;
      }
      if (step.channelId) {
        note.channelId = step.channelId;
      }
      let result;
      if (step.action === 'broadcast') {
        note.pushType = 'liveactivity';
        note.expiry = step.expiry;
        note.event = 'update';
        note.contentState = step.payload || {};
        note.timestamp = Math.floor(Date.now() / 1000);
        result = await provider.broadcast(note, config.bundleId);
      } else {
        if (step.action === 'create') {
          // As node-apn's README writes it: the policy as text, the push type added by the library.
          note.payload = { 'message-storage-policy': String(step.policy) };
        }
        result = await provider.manageChannels(note, config.bundleId, step.action);
      }
      const line = { name: step.name, sent: result.sent.length === 1 };
      if (result.sent.length === 1) {
        line.result = result.sent[0];
      } else if (result.failed.length === 1) {
        const failure = result.failed[0];
        line.result = {
          status: failure.status === undefined ? null : Number(failure.status),
          reason: failure.response ? failure.response.reason : String(failure.error),
          requestId: failure['apns-request-id'] || null,
        };
      }
      console.log(JSON.stringify(line));
    }
  } finally {
    await provider.shutdown();
  }
}

main().catch(error => {
  console.error(error);
  process.exit(1);
});
