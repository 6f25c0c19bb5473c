'use strict'
// One node of an Aedes MQTT cluster, for ./scripts/cluster --kind aedes.
//
//   node node.js --port P --redis redis://127.0.0.1:RP --id A [--heartbeat-ms 2000]
//
// Every node shares one Redis: aedes-persistence-redis holds sessions, retained
// messages, QoS-1 queues and Wills, and mqemitter-redis carries every publish to
// every node, so a client may connect to any node. Plain MQTT over TCP on
// 127.0.0.1 only. Logs one timestamped line per event on stdout; SIGTERM closes
// clients, Redis connections and the listener, then exits 0.
//
// The packages come from a cache (NODE_PATH), installed from package-lock.json.

const net = require('node:net')
const { pathToFileURL } = require('node:url')
const { parseArgs } = require('node:util')
const redisPersistence = require('aedes-persistence-redis')
const redisEmitter = require('mqemitter-redis')

const { values: args } = parseArgs({
  options: {
    port: { type: 'string' },
    redis: { type: 'string' },
    id: { type: 'string' },
    // how often a node tells the others it is alive: a node silent for 3 beats is taken as dead and
    // another node publishes the Wills of its clients (aedes' default of 60 s is too slow for tests)
    'heartbeat-ms': { type: 'string', default: '2000' }
  }
})
if (!args.port || !args.redis || !args.id) {
  console.error('usage: node node.js --port P --redis redis://127.0.0.1:RP --id NAME [--heartbeat-ms MS]')
  process.exit(2)
}
const HOST = '127.0.0.1'
const port = Number(args.port)

function log (...parts) {
  console.log(new Date().toISOString(), `[${args.id}]`, ...parts)
}

async function main () {
  // aedes 1.x is an ES module; import() by path because ES resolution ignores NODE_PATH
  // (and require() of an ES module needs Node >= 20.19)
  const { Aedes } = await import(pathToFileURL(require.resolve('aedes')).href)
  const redis = new URL(args.redis)
  const mq = redisEmitter({ connectionString: args.redis })
  const persistence = redisPersistence({
    host: redis.hostname,
    port: Number(redis.port || 6379),
    password: redis.password ? decodeURIComponent(redis.password) : undefined,
    db: Number(redis.pathname.slice(1) || 0)
  })
  const broker = await Aedes.createBroker({
    // one id per process, not the node's name: Wills stored by a killed node are published by the others once
    // its heartbeats stop, even when it is restarted within that time (a restarted "A" would keep them silent)
    id: `${args.id}-${process.pid}`,
    mq,
    persistence,
    heartbeatInterval: Number(args['heartbeat-ms'])
  })

  broker.on('client', (c) => log('connect', c.id))
  broker.on('clientDisconnect', (c) => log('disconnect', c.id))
  broker.on('clientError', (c, err) => log('client error', c.id, err.message))
  broker.on('connectionError', (c, err) => log('connection error', c && c.id, err.message))
  broker.on('keepaliveTimeout', (c) => log('keepalive timeout', c.id))
  broker.on('error', (err) => log('broker error', err.message))

  const server = net.createServer(broker.handle)
  server.on('error', (err) => {
    log('listener error', err.message)
    process.exit(1)
  })
  server.listen(port, HOST, () => log(`listening on ${HOST}:${port}, redis ${args.redis}, broker id ${broker.id}`))

  let stopping = false
  function stop (signal) {
    if (stopping) return
    stopping = true
    log(`${signal}: stopping`)
    // a Redis that is already gone must not keep this process alive
    setTimeout(() => { log('forced exit'); process.exit(0) }, 5000).unref()
    server.close()
    // aedes closes the emitter; the persistence's own Redis connection is ours to close (promise
    // form: its callback form waits for a 'ready' event that the async setup() never emits)
    broker.close(() => {
      persistence.destroy().catch(() => {}).finally(() => {
        log('stopped')
        process.exit(0)
      })
    })
  }
  process.on('SIGTERM', () => stop('SIGTERM'))
  process.on('SIGINT', () => stop('SIGINT'))
}

main().catch((err) => {
  log('failed to start:', err.stack || err.message)
  process.exit(1)
})
