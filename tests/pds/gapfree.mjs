// The `gapfree` scenario of driver.mjs (`node driver.mjs gapfree`): a network prepared before
// the writer starts, then driven one command at a time, for the tests of gap-free capture
// (issue 9: verification, identity from the PLC, backfill, resync, key rotation).
//
// Protocol (README.md, "gapfree scenario"): stdout carries one JSON object a line; logs go to
// stderr. The driver prints a ready line once the accounts and the pre-start records exist,
// then answers each stdin command with exactly one JSON line ({"ok": true, "cmd": ...} or
// {"ok": false, "cmd": ..., "error": ...}) and keeps going after a failed command. `stop` (or
// stdin EOF) shuts the network down and exits 0.
//
// Every answer that made a commit carries the commit as the PDS sequencer emitted it (the feed
// its subscribeRepos serves): repo, rev, since, commit CID, seq, time, ops, and the signing key
// that verified its signature: the driver fetches the DID document from the PLC for every commit
// and checks the signature of the commit block against that document's #atproto key, so after
// `rotate-key` every answer proves that the PDS signs with the key the PLC publishes.

import readline from 'node:readline'
import fs from 'node:fs/promises'
import { AtpAgent } from '@atproto/api'
import { TestNetworkNoAppView } from '@atproto/dev-env'
// Dependencies of @atproto/dev-env, hoisted to the top of node_modules by npm.
import * as crypto from '@atproto/crypto'
import { readCarWithRoot, verifyCommitSig, cborToLex } from '@atproto/repo'

const log = (...args) => console.error('[pds-driver gapfree]', ...args)
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

process.on('unhandledRejection', (err) => {
  log('failed:', err)
  process.exit(1)
})

// ---- network, sequencer feed -------------------------------------------------------------

const network = await TestNetworkNoAppView.create({})
const pds = network.pds
const plcUrl = network.plc.url
const sequencer = pds.ctx.sequencer

const seqEvents = [] // every event the sequencer emitted, in seq order
let seenSeq = 0
sequencer.on('events', (evts) => {
  for (const e of evts) {
    seqEvents.push({ type: e.type, seq: e.seq, time: e.time, did: e.evt.did ?? e.evt.repo, evt: e.evt })
    seenSeq = Math.max(seenSeq, e.seq)
  }
})
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
// Waits until the sequencer has emitted everything sequenced so far; returns that seq.
async function settle() {
  const curr = (await sequencer.curr()) ?? 0
  const deadline = Date.now() + 30_000
  while (seenSeq < curr) {
    if (Date.now() > deadline) throw new Error(`sequencer stuck at ${seenSeq} < ${curr}`)
    await sleep(20)
  }
  return curr
}

// ---- identity: the PLC document and commit signatures ------------------------------------

async function plcDocument(did) {
  const res = await fetch(`${plcUrl}/${encodeURIComponent(did)}`)
  if (!res.ok) throw new Error(`PLC ${plcUrl}/${did}: HTTP ${res.status}`)
  return res.json()
}
// The document's #atproto key as a did:key. The dev-env PLC writes the legacy form
// (`EcdsaSecp256k1VerificationKey2019`, an uncompressed key without multicodec prefix), as
// @atproto/identity's getDidKeyFromMultibase reads it; `Multikey` is the current form.
function atprotoKey(doc) {
  const vm = (doc.verificationMethod ?? []).find(
    (m) => m.id === '#atproto' || m.id === `${doc.id}#atproto`,
  )
  if (!vm?.publicKeyMultibase) throw new Error(`no #atproto key in ${JSON.stringify(doc)}`)
  if (vm.type === 'Multikey') {
    const parsed = crypto.parseMultikey(vm.publicKeyMultibase)
    return crypto.formatDidKey(parsed.jwtAlg, parsed.keyBytes)
  }
  const alg = {
    EcdsaSecp256k1VerificationKey2019: crypto.SECP256K1_JWT_ALG,
    EcdsaSecp256r1VerificationKey2019: crypto.P256_JWT_ALG,
  }[vm.type]
  if (!alg) throw new Error(`unsupported #atproto key type ${vm.type}`)
  return crypto.formatDidKey(alg, crypto.multibaseToBytes(vm.publicKeyMultibase))
}

// The sequencer's #commit event for (did, rev), once emitted.
async function commitEvent(did, rev) {
  await settle()
  const e = seqEvents.find((x) => x.type === 'commit' && x.did === did && x.evt.rev === rev)
  if (!e) throw new Error(`no sequenced commit of ${did} at rev ${rev}`)
  return e
}

// The commit as the firehose carries it, its signature checked with the PLC's current key.
async function describeCommit(did, rev) {
  const e = await commitEvent(did, rev)
  const { root, blocks } = await readCarWithRoot(e.evt.blocks)
  if (!root.equals(e.evt.commit)) throw new Error(`commit CAR root ${root} is not ${e.evt.commit}`)
  const block = blocks.get(e.evt.commit)
  if (!block) throw new Error(`commit block ${e.evt.commit} missing from the CAR`)
  const signed = cborToLex(block)
  const key = atprotoKey(await plcDocument(did))
  if (!(await verifyCommitSig(signed, key))) {
    throw new Error(`commit ${did} rev ${rev} does not verify with the PLC's key ${key}`)
  }
  return {
    repo: did,
    rev,
    since: e.evt.since ?? null,
    cid: e.evt.commit.toString(),
    prev_data: e.evt.prevData?.toString() ?? null,
    seq: e.seq,
    time: e.time,
    ops: e.evt.ops.map((op) => ({ action: op.action, path: op.path, cid: op.cid?.toString() ?? null })),
    signing_key: key,
    sig_ok: true,
  }
}

// ---- accounts and records ----------------------------------------------------------------

const PASSWORD = 'e2e-password'
const accounts = {} // label -> { label, name, agent, did, handle }
async function account(label) {
  const name = label.toLowerCase()
  const handle = `${name}-user.test`
  const agent = new AtpAgent({ service: pds.url })
  await agent.createAccount({ handle, email: `${name}@e2e.invalid`, password: PASSWORD })
  accounts[label] = { label, name, agent, did: agent.session.did, handle }
  return accounts[label]
}
for (const label of ['S1', 'S2', 'A1', 'A2', 'A3']) await account(label)
const { S1, S2, A1 } = accounts

const records = {} // name -> record description
const rkeyOf = (uri) => uri.split('/').pop()
const now = () => new Date().toISOString()

// Creates a record; returns [record, commit].
async function create(name, who, collection, fields, createdAt = now()) {
  const res = await who.agent.com.atproto.repo.createRecord({
    repo: who.did,
    collection,
    record: { $type: collection, createdAt, ...fields },
  })
  const { uri, cid, commit } = res.data
  if (!commit?.rev) throw new Error(`createRecord returned no commit rev: ${JSON.stringify(res.data)}`)
  const record = {
    name,
    uri,
    cid,
    rkey: rkeyOf(uri),
    collection,
    author: who.did,
    author_label: who.label,
    created_at: createdAt,
  }
  const described = await describeCommit(who.did, commit.rev)
  record.rev = described.rev
  record.seq = described.seq
  records[name] = record
  return [record, described]
}
const ref = (rec) => ({ uri: rec.uri, cid: rec.cid })
async function post(name, who, text, createdAt, extra = {}) {
  return create(name, who, 'app.bsky.feed.post', { text, ...extra }, createdAt)
}
// The reply's root: the parent's root when the parent is a reply, else the parent.
function replyRefs(parent) {
  return { root: parent.reply_root ?? ref(parent), parent: ref(parent) }
}

// ---- before the writer starts ------------------------------------------------------------

// S1's old posts carry backdated createdAt values (the records themselves are new: their rkeys
// and revs are TIDs of today), so a test can pick a --backfill-since between them.
await post('s1_old1', S1, 'S1 old post one', '2024-01-10T12:00:00.000Z')
await post('s1_old2', S1, 'S1 old post two (deleted during the gap)', '2024-01-11T12:00:00.000Z')
await post('s1_recent', S1, 'S1 recent post')
await post('a1_old', A1, 'A1 post before the start')
await create('s1_like_a1', S1, 'app.bsky.feed.like', { subject: ref(records.a1_old) })
// S1 follows A1: A1 is in-network through the follow graph only.
await create('s1_follow_a1', S1, 'app.bsky.graph.follow', { subject: A1.did })
await post('s2_post', S2, 'S2 post before the start')

const describeAccount = async (a) => ({
  did: a.did,
  handle: a.handle,
  signing_key: atprotoKey(await plcDocument(a.did)),
})
const accountList = {}
for (const [label, a] of Object.entries(accounts)) accountList[label] = await describeAccount(a)

const port = new URL(pds.url).port
emit({
  ready: true,
  scenario: 'gapfree',
  pds_url: pds.url,
  plc_url: plcUrl,
  ws: `ws://127.0.0.1:${port}`,
  subscribe_url: `ws://127.0.0.1:${port}/xrpc/com.atproto.sync.subscribeRepos`,
  last_seq: await settle(),
  study: [S1.did, S2.did],
  others: [accounts.A1.did, accounts.A2.did, accounts.A3.did],
  accounts: accountList,
  records,
})

// ---- commands ----------------------------------------------------------------------------

function who(label) {
  const a = accounts[String(label ?? '').toUpperCase()]
  if (!a) throw new Error(`unknown account ${JSON.stringify(label)} (S1, S2, A1, A2, A3)`)
  return a
}
function newName(name) {
  if (!/^[a-z0-9_]{1,64}$/.test(name ?? '')) throw new Error(`bad record name ${JSON.stringify(name)}`)
  if (records[name]) throw new Error(`record name ${name} is taken`)
  return name
}
// A record by name, or by at:// URI (then only uri/cid are known, cid from the PDS).
async function record(nameOrUri) {
  if (records[nameOrUri]) return records[nameOrUri]
  if (String(nameOrUri).startsWith('at://')) {
    const [, , repo, collection, rkey] = nameOrUri.split('/')
    const agent = new AtpAgent({ service: pds.url })
    const res = await agent.com.atproto.repo.getRecord({ repo, collection, rkey })
    return { uri: nameOrUri, cid: res.data.cid, rkey, collection, author: repo }
  }
  throw new Error(`unknown record ${JSON.stringify(nameOrUri)}`)
}
function targetDid(labelOrDid) {
  return String(labelOrDid).startsWith('did:') ? labelOrDid : who(labelOrDid).did
}

const commands = {
  // post WHO NAME [TEXT...]
  async post([w, name, ...text]) {
    const [rec, commit] = await post(newName(name), who(w), text.join(' ') || `post ${name}`)
    return { record: rec, commit }
  },
  // reply WHO NAME PARENT [TEXT...]
  async reply([w, name, parent, ...text]) {
    const p = await record(parent)
    const [rec, commit] = await post(newName(name), who(w), text.join(' ') || `reply ${name}`, now(), {
      reply: replyRefs(p),
    })
    rec.reply_root = replyRefs(p).root
    return { record: rec, commit }
  },
  // like WHO NAME SUBJECT
  async like([w, name, subject]) {
    const s = await record(subject)
    const [rec, commit] = await create(newName(name), who(w), 'app.bsky.feed.like', { subject: ref(s) })
    return { record: rec, commit }
  },
  // repost WHO NAME SUBJECT
  async repost([w, name, subject]) {
    const s = await record(subject)
    const [rec, commit] = await create(newName(name), who(w), 'app.bsky.feed.repost', { subject: ref(s) })
    return { record: rec, commit }
  },
  // follow WHO NAME TARGET (an account label or a DID)
  async follow([w, name, target]) {
    const [rec, commit] = await create(newName(name), who(w), 'app.bsky.graph.follow', {
      subject: targetDid(target),
    })
    return { record: rec, commit }
  },
  // block WHO NAME TARGET (an account label or a DID)
  async block([w, name, target]) {
    const [rec, commit] = await create(newName(name), who(w), 'app.bsky.graph.block', {
      subject: targetDid(target),
    })
    return { record: rec, commit }
  },
  // handle WHO NEW_HANDLE: the account changes its handle (com.atproto.identity.updateHandle):
  // a PLC operation and an #identity event, whose seq, time and handle are answered.
  async handle([w, handle]) {
    const a = who(w)
    if (!/^[a-z0-9-]{1,40}\.test$/.test(handle ?? '')) throw new Error('usage: handle WHO NAME.test')
    const before = await settle()
    await a.agent.com.atproto.identity.updateHandle({ handle })
    await settle()
    const e = seqEvents.find((x) => x.type === 'identity' && x.did === a.did && x.seq > before)
    if (!e) throw new Error(`no #identity event of ${a.did} after seq ${before}`)
    return { did: a.did, identity: { seq: e.seq, time: e.time, handle: e.evt.handle ?? null } }
  },
  // delete WHO RECORD
  async delete([w, name]) {
    const a = who(w)
    const rec = await record(name)
    if (rec.author !== a.did) throw new Error(`${name} belongs to ${rec.author}, not ${a.label}`)
    const res = await a.agent.com.atproto.repo.deleteRecord({
      repo: a.did,
      collection: rec.collection,
      rkey: rec.rkey,
    })
    const rev = res.data?.commit?.rev
    if (!rev) throw new Error(`deleteRecord returned no commit rev: ${JSON.stringify(res.data)}`)
    const commit = await describeCommit(a.did, rev)
    if (records[name]) records[name].deleted = { rev, seq: commit.seq }
    return { record: rec, commit }
  },
  // rotate-key WHO: a new secp256k1 repo signing key that the PDS signs later commits with,
  // published on the PLC (verificationMethods.atproto), then an #identity event.
  async 'rotate-key'([w]) {
    const a = who(w)
    const oldKey = atprotoKey(await plcDocument(a.did))
    const keypair = await crypto.Secp256k1Keypair.create({ exportable: true })
    const newKey = keypair.did()
    // The PDS reads the account's signing key from this file for every write (ActorStore.keypair).
    const { keyLocation } = await pds.ctx.actorStore.getLocation(a.did)
    await fs.writeFile(keyLocation, await keypair.export())
    const signer = await pds.ctx.actorStore.keypair(a.did)
    if (signer.did() !== newKey) throw new Error(`the PDS would sign with ${signer.did()}, not ${newKey}`)
    // The PLC operation, signed with the PDS's rotation key (which controls its accounts' DIDs).
    await pds.ctx.plcClient.updateAtprotoKey(a.did, pds.ctx.plcRotationKey, newKey)
    const plcKey = atprotoKey(await plcDocument(a.did))
    if (plcKey !== newKey) throw new Error(`the PLC document has ${plcKey}, not the new key ${newKey}`)
    // As com.atproto.identity.submitPlcOperation does: an #identity event, and the PDS's own
    // DID cache refreshed.
    const before = await settle()
    await sequencer.sequenceIdentity(a.did, a.handle)
    await pds.ctx.idResolver.did.resolve(a.did, true)
    await settle()
    const e = seqEvents.find((x) => x.type === 'identity' && x.did === a.did && x.seq > before)
    if (!e) throw new Error(`no #identity event of ${a.did} after seq ${before}`)
    return {
      did: a.did,
      old_key: oldKey,
      new_key: newKey,
      plc_key: plcKey,
      identity: { seq: e.seq, time: e.time, handle: e.evt.handle ?? null },
    }
  },
  // accounts PREFIX N: N more accounts, labelled PREFIX1..PREFIXN (for load: backfill
  // benchmarks), handles <label in lower case>-user.test
  async accounts([prefix, n]) {
    const count = Number(n)
    if (!/^[A-Z][A-Z0-9]{0,15}$/i.test(prefix ?? '') || !Number.isInteger(count) || count < 1) {
      throw new Error('usage: accounts PREFIX N')
    }
    const made = {}
    for (let i = 1; i <= count; i++) {
      const label = `${prefix}${i}`.toUpperCase()
      if (accounts[label]) throw new Error(`account ${label} exists`)
      made[label] = await describeAccount(await account(label))
    }
    return { accounts: made }
  },
  // bulk WHO N: N posts by WHO in commits of up to 200 creates (com.atproto.repo.applyWrites);
  // not named, not kept in `records` (for load: a large repo to backfill)
  async bulk([w, n]) {
    const a = who(w)
    const count = Number(n)
    if (!Number.isInteger(count) || count < 1) throw new Error('usage: bulk WHO N')
    const createdAt = now()
    let first = null
    let last = null
    for (let done = 0; done < count; ) {
      const batch = Math.min(200, count - done)
      const writes = Array.from({ length: batch }, (_, i) => ({
        $type: 'com.atproto.repo.applyWrites#create',
        collection: 'app.bsky.feed.post',
        value: { $type: 'app.bsky.feed.post', text: `bulk post ${done + i + 1}`, createdAt },
      }))
      const res = await a.agent.com.atproto.repo.applyWrites({ repo: a.did, writes })
      const rev = res.data?.commit?.rev
      if (!rev) throw new Error(`applyWrites returned no commit rev: ${JSON.stringify(res.data)}`)
      last = rev
      first ??= rev
      done += batch
    }
    const commit = await describeCommit(a.did, last)
    return { did: a.did, count, first_rev: first, commit }
  },
  // last-seq: the sequencer's last seq, every event up to it emitted
  async 'last-seq'() {
    return { last_seq: await settle() }
  },
  // records: every record the driver created, by name
  async records() {
    return { records }
  },
}

// ---- stdin loop --------------------------------------------------------------------------

const rl = readline.createInterface({ input: process.stdin })
for await (const raw of rl) {
  const line = raw.trim()
  if (!line) continue
  const [cmd, ...args] = line.split(/\s+/)
  if (cmd === 'stop') break
  const handler = Object.hasOwn(commands, cmd) ? commands[cmd] : null
  if (!handler) {
    emit({ ok: false, cmd, error: `unknown command ${JSON.stringify(cmd)}` })
    continue
  }
  try {
    emit({ ok: true, cmd, ...(await handler(args)) })
  } catch (err) {
    log(`${line}:`, err)
    emit({ ok: false, cmd, error: String(err?.message ?? err) })
  }
}
rl.close()
await network.close()
process.exit(0)
