//! Hostile connections: idle, slow and flooding ones.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::*;
use crate::commands::adversary::wire::{
    RawHello, Silence, connect, half_close, read_reply, send, stream_header,
};
use crate::rng::Rng;
use source_agent::sender::Agent;

pub(super) fn idle(ctx: &Context, rng: &mut Rng) -> Outcome {
    let hold = Duration::from_millis(
        1000 + rng.below(ctx.idle_max.as_millis().saturating_sub(1000) as u64 + 1),
    );
    let mut stream = match connect(ctx.data_addr) {
        Ok(stream) => stream,
        Err(e) => return Outcome::bad("connect failed", format!("connect: {e}")),
    };
    match read_reply(&mut stream, Instant::now() + hold) {
        Err(Silence::Timeout) => Outcome::ok("held open, no answer"),
        Ok(Ok(reply)) if reply.status == 11 || reply.status == 9 => {
            Outcome::ok(format!("refused {}", status_name(reply.status)))
        }
        Ok(Ok(reply)) => Outcome::bad(
            format!("answered {}", status_name(reply.status)),
            format!(
                "an idle connection was answered {}: {}",
                status_name(reply.status),
                reply.message
            ),
        ),
        Ok(Err(malformed)) => Outcome::bad("malformed reply", malformed),
        Err(silence) => Outcome::bad(
            format!("{silence}"),
            format!("an idle connection (held {hold:?}): {silence}"),
        ),
    }
}

pub(super) fn slow_trickle(ctx: &Context, rng: &mut Rng) -> Outcome {
    let index = pick(ctx, rng, false).unwrap_or(0);
    let t = &ctx.targets[index];
    let hello = RawHello::valid(1, t.id, &t.token, 0, 0).encode();
    let interval = Duration::from_millis(10 + rng.below(12_000 / hello.len() as u64));
    let mut stream = match connect(ctx.data_addr) {
        Ok(stream) => stream,
        Err(e) => return Outcome::bad("connect failed", format!("connect: {e}")),
    };
    for byte in &hello {
        if send(&mut stream, std::slice::from_ref(byte)).is_err() {
            break;
        }
        std::thread::sleep(interval);
    }
    let reply = match read_reply(&mut stream, Instant::now() + ctx.answer_timeout) {
        Ok(Ok(reply)) => reply,
        Ok(Err(malformed)) => return Outcome::bad("malformed reply", malformed),
        Err(silence) => {
            return Outcome::bad(
                format!("{silence}"),
                format!("a hello trickled at one byte per {interval:?}: {silence}"),
            );
        }
    };
    match reply.status {
        0 => {
            let _ = send(
                &mut stream,
                &stream_header(&t.id, &t.name, reply.next_seq, &t.disks),
            );
            half_close(&stream);
            let outcome = judge(
                &mut stream,
                reply.next_seq,
                Expect::EndOfStream,
                ctx.answer_timeout,
            );
            Outcome {
                answer: format!("ok, then {}", outcome.answer),
                failure: outcome.failure,
            }
        }
        status if transient(status) => Outcome::ok(format!("refused {}", status_name(status))),
        status => Outcome::bad(
            format!("refused {}", status_name(status)),
            format!(
                "a valid trickled hello refused {}: {}",
                status_name(status),
                reply.message
            ),
        ),
    }
}

pub(super) fn idle_flood(ctx: &Context, rng: &mut Rng) -> Outcome {
    if ctx.flooding.swap(true, Ordering::AcqRel) {
        return idle(ctx, rng);
    }
    let outcome = flood(ctx, rng);
    ctx.flooding.store(false, Ordering::Release);
    outcome
}

pub(super) fn flood(ctx: &Context, rng: &mut Rng) -> Outcome {
    let mut held = Vec::with_capacity(ctx.flood_connections);
    for _ in 0..ctx.flood_connections {
        match connect(ctx.data_addr) {
            Ok(stream) => held.push(stream),
            Err(_) => break,
        }
    }
    let agents: Vec<&Arc<Agent>> = ctx
        .targets
        .iter()
        .filter_map(|t| t.agent.as_ref())
        .collect();
    let started = Instant::now();
    let outcome = if agents.is_empty() {
        // No agent: a valid hello must still be served.
        let index = pick(ctx, rng, false).unwrap_or(0);
        match open_session(ctx, &ctx.targets[index]) {
            Ok((mut stream, n)) => {
                half_close(&stream);
                let _ = judge(&mut stream, n, Expect::EndOfStream, ctx.answer_timeout);
                Outcome::ok("valid hello served")
            }
            Err(outcome) if outcome.answer.contains("too-many-connections") => Outcome::bad(
                "valid hello locked out",
                format!(
                    "with {} idle connections open a valid hello was refused too-many-connections",
                    held.len()
                ),
            ),
            Err(outcome) => outcome,
        }
    } else {
        let agent = agents[rng.below(agents.len() as u64) as usize];
        let before = agent.acked_seq();
        agent.drop_connection();
        loop {
            if agent.acked_seq() > before {
                break Outcome::ok("agent served");
            }
            if started.elapsed() > ctx.flood_serve_deadline {
                break Outcome::bad(
                    "AGENT LOCKED OUT",
                    format!(
                        "with {} idle connections open, the real agent reconnected and got no \
                         ack for {:?}",
                        held.len(),
                        ctx.flood_serve_deadline
                    ),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    drop(held);
    outcome
}
