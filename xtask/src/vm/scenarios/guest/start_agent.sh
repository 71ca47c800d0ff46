
qcom-reset run > /tmp/agent.log 2>&1 & P=$!
wait_for /tmp/agent.log "agent running" 60 || { cat /tmp/agent.log; exit 1; }
