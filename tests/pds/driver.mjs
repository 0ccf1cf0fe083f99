// End-to-end driver for the firehose-writer test against the official atproto PDS.
//
// Run with Node >= 22 (tests/setup.sh installs it and the npm packages). Protocol, one JSON
// object per stdout line (anything else on stdout is noise to be ignored; logs go to stderr):
//
//   driver -> {"ws": "ws://127.0.0.1:PORT", "study": [S1, S2], "in_network": [A1], ...}
//   test   -> go
//   driver -> {"sync": SEQ}            (zero or more: the test answers "ok" once the writer's
//   test   -> ok                        stored cursor reached SEQ; used before account deletions,
//                                       which make the PDS drop the account's earlier events)
//   driver -> {"done": true, "last_seq": N, "expected": [cache-relative paths], "records": {...}}
//   test   -> stop                     (or stdin EOF) and the driver shuts the network down
//
// The network is @atproto/dev-env's TestNetworkNoAppView: an in-memory did:plc server and a
// PDS with SQLite storage under $TMPDIR; no appview, no Postgres.
//
// `expected` is written out here step by step from the routing rules of
// shared/spec/predecessor-data-format.md §3.3-§3.5 and our extensions (crates/sync-core/src/
// paths.rs, route.rs), NOT computed by the writer's code. The seqs of #identity/#account
// events (which name their cache files) are taken from the PDS's own sequencer: the driver
// listens to the sequencer's 'events' emitter, the same feed the PDS's subscribeRepos outbox
// serves to the writer, from before the first account is created.

import { createHash } from 'node:crypto'
import readline from 'node:readline'
import { AtpAgent } from '@atproto/api'
import { TestNetworkNoAppView } from '@atproto/dev-env'

// `node driver.mjs gapfree` runs the command-driven scenario of gapfree.mjs instead (its own
// protocol: README.md); without an argument (or with `default`), the scenario below.
const scenario = process.argv[2] ?? 'default'
if (scenario === 'gapfree') {
  await import('./gapfree.mjs') // exits the process when its network is shut down
  process.exit(0)
} else if (scenario !== 'default') {
  console.error(`[pds-driver] unknown scenario ${JSON.stringify(scenario)} (default, gapfree)`)
  process.exit(2)
}

const log = (...args) => console.error('[pds-driver]', ...args)
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

// ---- stdin lines -------------------------------------------------------------------------

const lines = []
const waiters = []
let stdinClosed = false
const rl = readline.createInterface({ input: process.stdin })
rl.on('line', (line) => {
  const w = waiters.shift()
  if (w) w(line.trim())
  else lines.push(line.trim())
})
rl.on('close', () => {
  stdinClosed = true
  while (waiters.length) waiters.shift()(null)
})
const nextLine = () =>
  lines.length
    ? Promise.resolve(lines.shift())
    : stdinClosed
      ? Promise.resolve(null)
      : new Promise((resolve) => waiters.push(resolve))
async function expectLine(word) {
  const line = await nextLine()
  if (line !== word) throw new Error(`expected "${word}" on stdin, got ${JSON.stringify(line)}`)
}

// ---- cache paths (spec §3.3 and paths.rs) ------------------------------------------------

const STUDY = 'study_user_activity'
const IN_NETWORK = 'in_network_user_activity'
const recordFile = (did, kind, rkey) => `author_did=${did}_${kind}_uri_suffix=${rkey}.json`
const followFile = (follower, followee) => `follower_did=${follower}_followee_did=${followee}.json`
// #account / #identity events are named by the event, never by the seq (paths.rs
// `account_file`): the time as sent (when it looks like one) and the first 16 hex digits of the
// SHA-256 of the JSON array [did, kind, time, handle, active, status].
const accountFile = (did, kind, time, handle, active, status) => {
  const digest = createHash('sha256')
    .update(JSON.stringify([did, kind, time, handle, active, status]))
    .digest('hex')
    .slice(0, 16)
  const shownTime = /^[0-9A-Za-z:.+-]{1,64}$/.test(time) ? time : 'invalid'
  return `did=${did}_${kind}_time=${shownTime}_event=${digest}.json`
}
const P = {
  studyPost: (did, rkey) => `${STUDY}/create/post/${recordFile(did, 'post', rkey)}`,
  reply: (studyRkey, did, rkey) =>
    `${STUDY}/create/reply_to_user_post/${studyRkey}/${recordFile(did, 'post', rkey)}`,
  inNetwork: (did, rkey) => `${IN_NETWORK}/create/post/${did}/${recordFile(did, 'post', rkey)}`,
  studyLike: (subjectRkey, did, rkey) =>
    `${STUDY}/create/like/${subjectRkey}/${recordFile(did, 'like', rkey)}`,
  likeOnUserPost: (postRkey, did, rkey) =>
    `${STUDY}/create/like_on_user_post/${postRkey}/${recordFile(did, 'like', rkey)}`,
  follower: (a, b) => `${STUDY}/create/follow/follower/${followFile(a, b)}`,
  followee: (a, b) => `${STUDY}/create/follow/followee/${followFile(a, b)}`,
  studyRepost: (did, rkey) => `${STUDY}/create/repost/${recordFile(did, 'repost', rkey)}`,
  repostOf: (postRkey, did, rkey) =>
    `${STUDY}/create/repost_of_user_post/${postRkey}/${recordFile(did, 'repost', rkey)}`,
  quoteOf: (postRkey, did, rkey) =>
    `${STUDY}/create/quote_of_user_post/${postRkey}/${recordFile(did, 'post', rkey)}`,
  block: (did, rkey) => `${STUDY}/create/block/${recordFile(did, 'block', rkey)}`,
  profile: (did, rev) =>
    `${STUDY}/create/profile/author_did=${did}_profile_uri_suffix=self_rev=${rev}.json`,
  // a study user deletes one of their own records
  studyDelete: (did, kind, rkey) => `${STUDY}/delete/${kind}/${recordFile(did, kind, rkey)}`,
  // the delete of a record routed earlier: its create folder with create -> delete, and the
  // delete file name `author_did=<author>_<kind>_uri_suffix=<rkey>.json`
  deleteOfRouted: (createDir, did, kind, rkey) =>
    `${createDir.replace('/create/', '/delete/')}/${recordFile(did, kind, rkey)}`,
  account: (e) =>
    `${STUDY}/account/${accountFile(e.did, e.type, e.time, e.handle, e.active, e.status)}`,
}

// ---- network, sequencer feed -------------------------------------------------------------

// Any failure ends the driver with a non-zero status (the test then shows this stderr).
process.on('unhandledRejection', (err) => {
  log('failed:', err)
  process.exit(1)
})
const network = await TestNetworkNoAppView.create({})
const pds = network.pds
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
// Lets the writer catch up to everything sequenced so far.
async function checkpoint() {
  const seq = await settle()
  emit({ sync: seq })
  await expectLine('ok')
  return seq
}

// ---- accounts ----------------------------------------------------------------------------

const PASSWORD = 'e2e-password'
async function account(name) {
  const agent = new AtpAgent({ service: pds.url })
  await agent.createAccount({
    handle: `${name}-user.test`,
    email: `${name}@e2e.invalid`,
    password: PASSWORD,
  })
  return { name, agent, did: agent.session.did }
}
const S1 = await account('s1')
const S2 = await account('s2')
const A1 = await account('a1')
const A2 = await account('a2')
const A3 = await account('a3')
const study = new Set([S1.did, S2.did])

const now = () => new Date().toISOString()
const rkeyOf = (uri) => uri.split('/').pop()
async function create(who, collection, fields, rkey) {
  const res = await who.agent.com.atproto.repo.createRecord({
    repo: who.did,
    collection,
    rkey,
    record: { $type: collection, createdAt: now(), ...fields },
  })
  const { uri, cid, commit } = res.data
  return { uri, cid, rkey: rkeyOf(uri), rev: commit?.rev, ref: { uri, cid } }
}
async function del(who, rec) {
  const [, , , collection, rkey] = rec.uri.split('/')
  await who.agent.com.atproto.repo.deleteRecord({ repo: who.did, collection, rkey })
}
const post = (who, text, extra = {}) => create(who, 'app.bsky.feed.post', { text, ...extra })
const reply = (who, text, root, parent) =>
  post(who, text, { reply: { root: root.ref, parent: parent.ref } })
const like = (who, subject) => create(who, 'app.bsky.feed.like', { subject: subject.ref })
const repost = (who, subject) => create(who, 'app.bsky.feed.repost', { subject: subject.ref })
const follow = (who, subject) => create(who, 'app.bsky.graph.follow', { subject: subject.did })
async function putProfile(who, displayName) {
  const res = await who.agent.com.atproto.repo.putRecord({
    repo: who.did,
    collection: 'app.bsky.actor.profile',
    rkey: 'self',
    record: { $type: 'app.bsky.actor.profile', displayName, description: `${displayName} (e2e)` },
  })
  return { uri: res.data.uri, cid: res.data.cid, rev: res.data.commit?.rev }
}

emit({
  ws: `ws://127.0.0.1:${pds.port}`,
  study: [S1.did, S2.did],
  in_network: [A1.did],
  others: [A2.did, A3.did],
  names: Object.fromEntries([S1, S2, A1, A2, A3].map((a) => [a.name, a.did])),
  // Only with PDS_DRIVER_URLS=1 (a writer that resolves identities needs the PLC's URL);
  // without it the line is as it always was.
  ...(process.env.PDS_DRIVER_URLS === '1' ? { pds_url: pds.url, plc_url: network.plc.url } : {}),
})
await expectLine('go')

// ---- scenario ----------------------------------------------------------------------------

const expected = new Set()
const expect = (...paths) => paths.forEach((p) => expected.add(p))
const records = {} // what the test spot-checks

// S1 posts P1: a study post (P1 rule).
const p1 = await post(S1, 'P1: hello from study user one')
expect(P.studyPost(S1.did, p1.rkey))
// A1 (in-network by file) posts: P3 rule.
const q1 = await post(A1, 'Q1: in-network post')
expect(P.inNetwork(A1.did, q1.rkey))
// S2 posts.
const p2 = await post(S2, 'P2: study user two, deleted later')
expect(P.studyPost(S2.did, p2.rkey))
// A2 replies to P1: nested under P1.
const r1 = await reply(A2, 'R1: reply to P1', p1, p1)
expect(P.reply(p1.rkey, A2.did, r1.rkey))
// A3 replies to A2's reply (root P1): nested under the root P1 (rule R).
const r2 = await reply(A3, 'R2: nested reply', p1, r1)
expect(P.reply(p1.rkey, A3.did, r2.rkey))
// S2 replies to P1: its own post (P1) and a reply to a study post (P2).
const r3 = await reply(S2, 'R3: a study user replies to a study post', p1, p1)
expect(P.studyPost(S2.did, r3.rkey), P.reply(p1.rkey, S2.did, r3.rkey))
// A2 likes P1 (L2).
const l1 = await like(A2, p1)
expect(P.likeOnUserPost(p1.rkey, A2.did, l1.rkey))
// S2 likes A1's post (L1).
const l2 = await like(S2, q1)
expect(P.studyLike(q1.rkey, S2.did, l2.rkey))
// S2 likes P1: L1 and L2.
const l3 = await like(S2, p1)
expect(P.studyLike(p1.rkey, S2.did, l3.rkey), P.likeOnUserPost(p1.rkey, S2.did, l3.rkey))
// S1 follows A2 (F1): A2 joins the in-network set live, so A2's next post is routed (P3).
const f1 = await follow(S1, A2)
expect(P.follower(S1.did, A2.did))
const q2 = await post(A2, 'Q2: A2 is in-network now')
expect(P.inNetwork(A2.did, q2.rkey))
// A1 follows S2 (F2).
const f2 = await follow(A1, S2)
expect(P.followee(A1.did, S2.did))
// A2 reposts P1; A3 quotes P1; S1 reposts A1's post.
const rp1 = await repost(A2, p1)
expect(P.repostOf(p1.rkey, A2.did, rp1.rkey))
const qt = await post(A3, 'QT: quoting P1', {
  embed: { $type: 'app.bsky.embed.record', record: p1.ref },
})
expect(P.quoteOf(p1.rkey, A3.did, qt.rkey))
const rp2 = await repost(S1, q1)
expect(P.studyRepost(S1.did, rp2.rkey))
// S1 blocks A3.
const b1 = await create(S1, 'app.bsky.graph.block', { subject: A3.did })
expect(P.block(S1.did, b1.rkey))
// S1 creates, then updates, its profile: one file per commit rev.
const prof1 = await putProfile(S1, 'Study One')
const prof2 = await putProfile(S1, 'Study One (edited)')
if (!prof1.rev || !prof2.rev || prof1.rev === prof2.rev) throw new Error('profile revs missing')
expect(P.profile(S1.did, prof1.rev), P.profile(S1.did, prof2.rev))
// A2 unlikes P1: the delete of a like routed to like_on_user_post/<P1>.
await del(A2, l1)
expect(P.deleteOfRouted(`${STUDY}/create/like_on_user_post/${p1.rkey}`, A2.did, 'like', l1.rkey))
// S1 unfollows A2: a study user's own delete; A2 leaves the in-network set.
await del(S1, f1)
expect(P.studyDelete(S1.did, 'follow', f1.rkey))
const q3 = await post(A2, 'Q3: A2 is no longer in-network: not routed')
// A2 deletes its reply R1 (routed under P1); A2 is not in-network any more.
await del(A2, r1)
expect(P.deleteOfRouted(`${STUDY}/create/reply_to_user_post/${p1.rkey}`, A2.did, 'post', r1.rkey))
// S2 deletes its post P2 (S2 is not in-network).
await del(S2, p2)
expect(P.studyDelete(S2.did, 'post', p2.rkey))
// A1 posts and deletes a post: the in-network post and its in-network delete.
const q4 = await post(A1, 'Q4: in-network post, deleted')
expect(P.inNetwork(A1.did, q4.rkey))
await del(A1, q4)
expect(P.deleteOfRouted(`${IN_NETWORK}/create/post/${A1.did}`, A1.did, 'post', q4.rkey))
// S2 unlikes A1's post: a study user's own delete.
await del(S2, l2)
expect(P.studyDelete(S2.did, 'like', l2.rkey))
// A1 unfollows S2: the delete of a follow routed to follow/followee.
await del(A1, f2)
expect(P.deleteOfRouted(`${STUDY}/create/follow/followee`, A1.did, 'follow', f2.rkey))
// S1 changes its handle: an #identity event.
await S1.agent.com.atproto.identity.updateHandle({ handle: 's1-renamed-user.test' })
// S2 deactivates, then reactivates: #account events (activation also sends #identity, #sync).
await S2.agent.com.atproto.server.deactivateAccount({})
await S2.agent.com.atproto.server.activateAccount()
// A3 (not a study user) deletes its account: nothing is written. The PDS deletes A3's earlier
// events from its log, so the writer must have read them first.
await checkpoint()
const admin = new AtpAgent({ service: pds.url })
const adminOpts = { headers: pds.adminAuthHeaders(), encoding: 'application/json' }
await admin.com.atproto.admin.deleteAccount({ did: A3.did }, adminOpts)
// S1 posts after all that.
const p3 = await post(S1, 'P3: still here')
expect(P.studyPost(S1.did, p3.rkey))
// S2 (a study user) deletes its account at the very end: an #account event.
await checkpoint()
await admin.com.atproto.admin.deleteAccount({ did: S2.did }, adminOpts)

const lastSeq = await settle()

// #identity / #account events of study users, with the seqs the PDS gave them.
const accountEvents = []
for (const e of seqEvents) {
  if ((e.type === 'identity' || e.type === 'account') && study.has(e.did)) {
    const event = {
      did: e.did,
      type: e.type,
      seq: e.seq,
      time: e.time,
      handle: e.evt.handle ?? null,
      active: e.evt.active ?? null,
      status: e.evt.status ?? null,
    }
    expect(P.account(event))
    accountEvents.push(event)
  }
}

Object.assign(records, {
  p1: p1.uri,
  p2: p2.uri,
  p3: p3.uri,
  q1: q1.uri,
  q3: q3.uri,
  r1: r1.uri,
  r2: r2.uri,
  r3: r3.uri,
  l1: l1.uri,
  l2: l2.uri,
  l3: l3.uri,
  f1: f1.uri,
  f2: f2.uri,
  rp1: rp1.uri,
  rp2: rp2.uri,
  qt: qt.uri,
  b1: b1.uri,
  profile_revs: [prof1.rev, prof2.rev],
  account_events: accountEvents,
})

emit({
  done: true,
  last_seq: lastSeq,
  expected: [...expected].sort(),
  records,
  event_counts: seqEvents.reduce((m, e) => ((m[e.type] = (m[e.type] ?? 0) + 1), m), {}),
})

// ---- shutdown ----------------------------------------------------------------------------

const last = await nextLine()
if (last !== null && last !== 'stop') log(`unexpected line ${JSON.stringify(last)}, stopping`)
rl.close()
await network.close()
process.exit(0)
